"""vllm-flexprefill: FlexPrefill context-aware sparse prefill attention for vLLM.

Importing the package is cheap: it loads neither vLLM, transformers nor the Triton kernels.
The public names below are imported on first use (``patch_model`` loads transformers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_PUBLIC = {
    "FlexPrefillConfig": "vllm_flexprefill.config",
    "FlexPrefillStats": "vllm_flexprefill.attention",
    "flex_prefill_attention": "vllm_flexprefill.attention",
    "flex_prefill_attention_varlen": "vllm_flexprefill.attention",
    "flex_prefill_stats": "vllm_flexprefill.attention",
    "patch_model": "vllm_flexprefill.hf.attention",
}

__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:
    from vllm_flexprefill.attention import (
        FlexPrefillStats,
        flex_prefill_attention,
        flex_prefill_attention_varlen,
        flex_prefill_stats,
    )
    from vllm_flexprefill.config import FlexPrefillConfig
    from vllm_flexprefill.hf.attention import patch_model


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'vllm_flexprefill' has no attribute {name!r}")
