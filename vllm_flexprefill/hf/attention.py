"""FlexPrefill as a transformers attention implementation: ``attn_implementation="flex_prefill"``.

transformers 5 routes every modern decoder's attention through one registry
(``AttentionInterface``), so one function serves them all:

    from vllm_flexprefill.hf import attention
    attention.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="flex_prefill")
    # or: model.set_attn_implementation("flex_prefill"); or: patch_model(model, {"gamma": 0.9})
    # or, as the original FlexPrefill writes it: patch_model(model, "flex_prefill", {"flex_prefill_gamma": 0.9})

Prefills (query length equal to key length, no padding mask, long enough:
``FlexPrefillConfig.long_enough``) run FlexPrefill; everything else (decode steps with a KV cache, short prompts,
padded batches) runs SDPA. The log says once which path a call took and why, at WARNING
level for what FlexPrefill cannot serve (another head_dim; fp32 on CUDA).

Settings: ``FlexPrefillConfig`` fields (or the reference code's keys: ``block_size``,
``flex_prefill_gamma``, ...) in ``model.config.flexprefill``; ``patch_model`` sets them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from vllm_flexprefill.attention import SUPPORTED_HEAD_DIMS, flex_prefill_attention
from vllm_flexprefill.config import FlexPrefillConfig

NAME = "flex_prefill"
CONFIG_KEY = "flexprefill"
logger = logging.getLogger("vllm_flexprefill.hf")
_said: set[str] = set()


def say_once(message: str, level: int = logging.INFO) -> None:
    if message not in _said:
        _said.add(message)
        logger.log(level, message)


def layer_config(module: torch.nn.Module) -> FlexPrefillConfig:
    """The layer's validated settings (its ``layer_gamma`` by the module's ``layer_idx`` and
    the model's ``num_hidden_layers``), built once per attention module from its model config."""
    cfg = getattr(module, "_flexprefill_config", None)
    if cfg is None:
        cfg = FlexPrefillConfig.from_dict(getattr(module.config, CONFIG_KEY, None))
        depth = getattr(module.config, "num_hidden_layers", None)
        cfg = (cfg if depth is None else cfg.for_depth(depth)).for_layer(getattr(module, "layer_idx", None))
        module._flexprefill_config = cfg
    return cfg


def dense_reason(query: torch.Tensor, key: torch.Tensor, attention_mask, dropout: float, cfg: FlexPrefillConfig,
                 module: torch.nn.Module) -> str | None:
    """Why this call runs SDPA (None: FlexPrefill serves it)."""
    q_len, k_len = query.shape[2], key.shape[2]
    if q_len != k_len:
        return "decode steps and continuations of a KV cache run SDPA"
    if attention_mask is not None:
        return "batches with a padding mask (or a non-causal mask) run SDPA"
    if dropout:
        return "attention dropout (training) runs SDPA"
    if not getattr(module, "is_causal", True):
        return "non-causal attention runs SDPA"
    if query.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {query.shape[-1]} is not served by FlexPrefill (it serves {SUPPORTED_HEAD_DIMS}): SDPA"
    if query.dtype not in (torch.bfloat16, torch.float16) and query.is_cuda:
        return f"dtype {query.dtype} is not served by FlexPrefill on CUDA (bf16, fp16): SDPA"
    if not cfg.long_enough(k_len):
        return "prompts too short for sparse attention to pay (FlexPrefillConfig.min_sparse_tokens) run SDPA"
    return None


def flex_prefill_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract.

    Args:
        query: [B, HQ, Q, D]; key, value: [B, H, K, D] (the cache already updated).
    Returns:
        ([B, Q, HQ, D], None).
    """
    cfg = layer_config(module)
    reason = dense_reason(query, key, attention_mask, dropout, cfg, module)
    if reason is not None:
        # what FlexPrefill cannot serve is a warning; what it leaves to SDPA by design is not
        say_once(f"FlexPrefill (transformers): {reason}", logging.WARNING if "not served" in reason else logging.INFO)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    say_once(f"FlexPrefill (transformers): long prefills run FlexPrefill ({cfg})")
    out = flex_prefill_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), config=cfg,
                                 softmax_scale=scaling)
    return out, None


def register() -> None:
    """Registers ``flex_prefill`` with transformers (idempotent)."""
    AttentionInterface.register(NAME, flex_prefill_forward)
    # the same masks as SDPA: None for unpadded causal batches, which is what FlexPrefill serves
    AttentionMaskInterface.register(NAME, sdpa_mask)


PATTERNS = ("flex_prefill",)


def patch_model(model: torch.nn.Module, pattern: str | FlexPrefillConfig | Mapping[str, Any] | None = None,
                config: FlexPrefillConfig | Mapping[str, Any] | None = None) -> torch.nn.Module:
    """Runs ``model``'s prefills through FlexPrefill.

    Both forms work: ``patch_model(model, config)`` and the original FlexPrefill's
    ``patch_model(model, "flex_prefill", config)`` (its keys: ``block_size``,
    ``flex_prefill_gamma``, ...). Validates the settings first (the same errors as the vLLM
    path), then switches the model's attention implementation to ``flex_prefill``.
    Returns the model.

    Raises ValueError for a pattern other than "flex_prefill", and for a vLLM ``LLM`` (the
    original's vLLM form), which takes FlexPrefill as its attention backend instead.
    """
    if type(model).__module__.split(".")[0] == "vllm":
        raise ValueError(
            "patch_model patches transformers models; a vLLM engine takes FlexPrefill as its attention backend: "
            "LLM(model, attention_backend=\"FLEX_PREFILL\", additional_config={\"flexprefill\": {...}}) "
            "(or vllm serve ... --attention-backend FLEX_PREFILL), with chunked prefill and batching left on")
    if isinstance(pattern, str):
        if pattern not in PATTERNS:
            raise ValueError(f"pattern {pattern!r} is not served here: vllm-flexprefill patches models with "
                             f"'flex_prefill' only (for dense attention, load the model without patch_model)")
    elif config is not None:
        raise ValueError("patch_model takes (model, config) or (model, 'flex_prefill', config), not both configs")
    else:
        config = pattern
    cfg = config if isinstance(config, FlexPrefillConfig) else FlexPrefillConfig.from_dict(config)
    if isinstance(getattr(model.config, "num_hidden_layers", None), int):
        cfg = cfg.for_depth(model.config.num_hidden_layers)  # this model's layers; an overlap is said now
    register()
    model.config.flexprefill = cfg.to_dict()
    for module in model.modules():
        if hasattr(module, "_flexprefill_config"):
            del module._flexprefill_config
    model.set_attn_implementation(NAME)
    return model
