"""Reading FlexPrefill's settings from vLLM's config, and which layers it can serve."""

from __future__ import annotations

from vllm.logger import init_logger

from vllm_flexprefill.attention import SUPPORTED_HEAD_DIMS
from vllm_flexprefill.backend import compat
from vllm_flexprefill.config import FlexPrefillConfig

KEY = "flexprefill"
# compat.py's logger with vLLM's *_once methods: info_once drops repeats in this process
logger = init_logger(compat.logger.name)


def config_from_vllm(vllm_config) -> FlexPrefillConfig:
    """``additional_config["flexprefill"]`` as a validated FlexPrefillConfig.

    Raises ValueError (which stops the engine from starting) on unknown keys or bad values.
    """
    extra = getattr(vllm_config, "additional_config", None) or {}
    try:
        return FlexPrefillConfig.from_dict(extra.get(KEY))
    except ValueError as e:
        raise ValueError(f"invalid --additional-config '{{\"{KEY}\": ...}}': {e}") from None


def unsupported_layer_reason(impl, attn_type_decoder: str) -> str | None:
    """Why FlexPrefill cannot serve this attention layer's prefills (None: it can)."""
    if impl.attn_type != attn_type_decoder:
        return f"attention type {impl.attn_type} (FlexPrefill serves causal decoder attention)"
    if impl.head_size not in SUPPORTED_HEAD_DIMS:
        return f"head size {impl.head_size} (supported: {SUPPORTED_HEAD_DIMS})"
    window = getattr(impl, "sliding_window", None)
    if window not in (None, -1, (-1, -1)):
        return f"sliding window {window}"
    if getattr(impl, "alibi_slopes", None) is not None:
        return "ALiBi"
    if getattr(impl, "logits_soft_cap", None):
        return "logit soft-capping"
    if getattr(impl, "sinks", None) is not None:
        return "attention sinks"
    if getattr(impl, "kv_sharing_target_layer_name", None) is not None:
        return "a KV cache shared with another layer"
    return None
