"""Reading FlexPrefill's settings from vLLM's config, and which layers it can serve."""

from __future__ import annotations

import logging

import torch

from vllm_flexprefill.attention import SUPPORTED_HEAD_DIMS
from vllm_flexprefill.backend import compat
from vllm_flexprefill.backend.cost_routing import TYPICAL_DENSITY, DensityMemory, Router
from vllm_flexprefill.config import FlexPrefillConfig
from vllm_flexprefill.costs import CostModel, rates_for

KEY = "flexprefill"


class FlexPrefillSettingsError(ValueError):
    """A bad ``additional_config["flexprefill"]``: what is wrong, and where it was set."""


def config_from_vllm(vllm_config, depth: bool = True) -> FlexPrefillConfig:
    """``additional_config["flexprefill"]`` as a validated FlexPrefillConfig (vLLM's config or
    its engine arguments: both hold ``additional_config``), ``layer_gamma``'s shares of the
    depth as layer indices where the config holds the model (unless ``depth`` is False).

    Raises FlexPrefillSettingsError (a ValueError, which stops the engine from starting) on
    unknown keys or bad values.
    """
    extra = compat.additional_config(vllm_config)
    if not depth:
        return settings_from(extra)
    has_model = getattr(vllm_config, "model_config", None) is not None
    return settings_from(extra, compat.num_layers(vllm_config), has_model)


def settings_from(extra: dict, num_layers: int | None = None, has_model: bool = False) -> FlexPrefillConfig:
    try:
        cfg = FlexPrefillConfig.from_dict(extra.get(KEY))
        if num_layers is not None:
            return cfg.for_depth(num_layers)
        if has_model and cfg.has_depth_shares:
            # said at start-up, not by the first layer call
            raise ValueError(f"layer_gamma {cfg.to_dict()['layer_gamma']} names layers by share of the depth "
                             "(the default names the first half), and this model's config gives no number of "
                             "layers: name them by index, or set layer_gamma to {} for gamma in every layer")
        return cfg
    except ValueError as e:
        raise FlexPrefillSettingsError(
            f"invalid FlexPrefill setting: {e}. Given as additional_config={{'{KEY}': {extra.get(KEY)!r}}} "
            f"(CLI: --additional-config '{{\"{KEY}\": {{...}}}}')") from None


def unsupported_layer_reason(impl, attn_type_decoder: str) -> str | None:
    """Why FlexPrefill cannot serve this attention layer's prefills (None: it can)."""
    if impl.attn_type != attn_type_decoder:
        return f"attention type {impl.attn_type} (FlexPrefill serves causal decoder attention)"
    if impl.head_size not in SUPPORTED_HEAD_DIMS:
        return f"head size {impl.head_size} (supported: {SUPPORTED_HEAD_DIMS})"
    features = compat.layer_features(impl)
    if features.sliding_window is not None:
        return f"sliding window {features.sliding_window}"
    if features.alibi:
        return "ALiBi"
    if features.soft_cap:
        return "logit soft-capping"
    if features.sinks:
        return "attention sinks"
    if features.shares_kv_cache:
        return "a KV cache shared with another layer"
    return None


def make_router(cfg: FlexPrefillConfig, vllm_config, layer_names, device, kernel: str = "triton") -> Router | None:
    """The cost-model router of one KV-cache group (None where the config fixes thresholds).

    Says once at start-up from which prompt length sparse attention may pay on this device,
    or that it never will below max_model_len, and what to change.
    """
    if not cfg.cost_routing:
        compat.say_once(logging.INFO, "FlexPrefill routing: fixed thresholds (min_sparse_tokens=%s, "
                        "min_sparse_query_tokens=%s)", cfg.min_sparse_tokens, cfg.min_sparse_query_tokens)
        return None
    model = vllm_config.model_config
    heads, head_dim = model.get_num_attention_heads(vllm_config.parallel_config), model.get_head_size()
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    kv_heads = model.get_num_kv_heads(vllm_config.parallel_config)
    cost = CostModel(rates_for(name, head_dim, kernel), heads, head_dim, cfg.sparse_block_size,
                     num_kv_heads=kv_heads)
    router = Router(cfg, cost, DensityMemory(list(layer_names), device))
    first = next((n for n in (2 ** (i / 4) for i in range(40, 81)) if router.candidate(int(n), int(n))
                  and cost.pays([int(n)], [int(n)], TYPICAL_DENSITY)), None)
    where = name or "CPU"
    if first is None or first > model.max_model_len:
        compat.say_once(
            logging.WARNING,
            "FlexPrefill will run no sparse prefill: on %s its cost model predicts dense attention faster for every "
            "prompt up to max_model_len=%d%s. Set additional_config {\"flexprefill\": {\"min_sparse_tokens\": N}} to "
            "run sparse from N tokens anyway.", where, model.max_model_len,
            " (its PyTorch path is slower than vLLM's CPU kernel)" if name is None else "")
    else:
        router.sparse_from = int(first)
        compat.say_once(logging.INFO, "FlexPrefill routing: cost model for %s; sparse attention may pay from "
                        "about %d tokens, per layer where it measured a low density", where, int(first))
    return router
