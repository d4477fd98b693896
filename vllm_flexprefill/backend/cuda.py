"""FlexPrefill on CUDA: vLLM's FlashAttention backend for decodes and short prefills,
FlexPrefill's Triton kernels for long prefills.

The backend subclasses FlashAttention, so the KV-cache layout and the cache writes are
FlashAttention's own. Each step the builder plans the batch (``routing.plan_batch``):
without a long prefill it returns FlashAttention's metadata unchanged (pure-decode
batches stay capturable by CUDA graphs); otherwise the dense requests run FlashAttention
in contiguous runs and the long prefills run FlexPrefill. A long prefill reads every key
position 0 .. seq_len-1 from the paged cache (the current chunk is written there before
attention runs), so fresh prompts, chunked-prefill continuations and prefix-cache hits
take the same path.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from vllm_flexprefill.attention import choose_kernel, compile_kernels
from vllm_flexprefill.backend import compat
from vllm_flexprefill.backend.cost_routing import COUNT_SLOTS
from vllm_flexprefill.backend.routing import SparsePlan, dense_run_metadata, extend_metadata, plan_batch
from vllm_flexprefill.backend.settings import config_from_vllm, make_router, unsupported_layer_reason
from vllm_flexprefill.backend.sparse import FlexPrefillForward
from vllm_flexprefill.layout.paged import paged_rows


@dataclasses.dataclass
class FlexPrefillMetadata(FlashAttentionMetadata):
    """FlashAttention's metadata for the whole batch, plus the FlexPrefill plan.

    runs: (first token, end token, FlashAttention metadata) of each run of dense requests.
    """

    plan: SparsePlan | None = None
    runs: tuple = ()


class FlexPrefillMetadataBuilder(FlashAttentionMetadataBuilder):
    supports_update_block_table = False

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.flex_config = config_from_vllm(vllm_config)
        layers = compat.attention_layers(vllm_config, layer_names)
        reasons = {getattr(layer.impl, "unsupported", "a non-FlexPrefill impl") for layer in layers.values()} - {None}
        self.flex_enabled = not reasons
        self.router = None
        self.kernel = "triton"
        if reasons:
            compat.say_once(logging.INFO, "FlexPrefill: a KV-cache group with %s runs FlashAttention only",
                             ", ".join(sorted(reasons)))
        else:
            compat.say_once(logging.INFO, "FlexPrefill active: %s", self.flex_config)
            cfg = self.flex_config
            self.kernel, why = choose_kernel(device, kv_cache_spec.dtype, kv_cache_spec.head_size,
                                             cfg.sparse_block_size, cfg.kernel)
            if self.kernel == "fa4":
                compat.say_once(logging.INFO, "FlexPrefill: sparse attention runs on vLLM's FlashAttention-4 "
                                "(block-sparse forward of vllm.vllm_flash_attn.cute)")
            else:
                compat.say_once(logging.INFO, "FlexPrefill: sparse attention runs on its Triton kernel%s",
                                f" (FlashAttention-4 does not run here: {why})" if why else "")
            self.router = make_router(cfg, vllm_config, layer_names, device, self.kernel)
            # every variant the layers can launch, whatever the router expects: a layer may run
            # sparse at lengths the start-up estimate did not foresee, and a variant compiled in
            # the middle of a request costs that request seconds
            if layers:
                compile_ahead(cfg, next(iter(layers.values())).impl, kv_cache_spec.dtype, device,
                              COUNT_SLOTS if self.router is not None else 0)

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
        # prefill batches run eagerly; only pure-decode batches may be captured whole
        dense = super().get_cudagraph_support(vllm_config, kv_cache_spec)
        return min(dense, AttentionCGSupport.UNIFORM_BATCH, key=lambda s: s.value)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        cm = common_attn_metadata
        plan = None
        if self.flex_enabled and cm.max_query_len > 1:
            seq_lens = compat.host_seq_lens(cm)
            plan = plan_batch(cm.query_start_loc_cpu, seq_lens, cm.block_table_tensor, self.block_size,
                              self.flex_config, decode_threshold=1, router=self.router, kernel=self.kernel)
        if plan is None:
            return super().build(common_prefix_len, cm, fast_build)
        # ahead-of-time scheduling writes one persistent buffer: a step with dense runs builds
        # several metadata, which would overwrite each other, so they schedule inside the
        # kernel; a step without them builds once and keeps it for its dense layers
        build = super().build
        whole = build(common_prefix_len, cm, fast_build=fast_build or bool(plan.dense_runs))
        runs = dense_run_metadata(cm, plan, lambda run_cm: build(0, run_cm, fast_build=True))
        return extend_metadata(whole, FlexPrefillMetadata, plan=plan, runs=runs)


class FlexPrefillImpl(FlexPrefillForward, FlashAttentionImpl):
    # decode context parallelism would shard the KV cache that FlexPrefill reads whole
    can_return_lse_for_decode = False
    supports_dcp = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unsupported = unsupported_layer_reason(self, AttentionType.DECODER)

    def group_keys(self, index, group, key, value, kv_cache, attn_metadata):
        """The paged cache's key and value views [pages, page_size, H, D], read in place at
        the group's rows (the current chunk is written there before attention runs)."""
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        return key_cache, value_cache, cache_rows(key_cache, group)


_compiled: set = set()


def compile_ahead(cfg, impl, dtype: torch.dtype, device, count_slots: int) -> None:
    """Compiles the sparse path's kernels (Triton's, and FlashAttention-4's variant where it
    runs) for this layer shape, once per process, so that start-up pays for it instead of the
    first long prompt (``attention.compile_kernels``; count_slots: the router's counters per
    layer call, 0 without a router)."""
    key = (impl.num_heads, impl.num_kv_heads, impl.head_size, dtype, cfg, count_slots)
    if key in _compiled:
        return
    _compiled.add(key)
    start = time.perf_counter()
    try:
        with torch.cuda.device(device):
            compile_kernels(impl.num_heads, impl.num_kv_heads, impl.head_size, cfg, dtype, device, count_slots)
            torch.cuda.synchronize()
    except Exception as e:  # the engine still starts; the first sparse prompt compiles (and reports) them
        compat.say_once(logging.WARNING, "FlexPrefill could not compile its kernels at start-up (%s: %s); they "
                        "compile at the first long prompt", type(e).__name__, e)
        return
    compat.say_once(logging.INFO, "FlexPrefill: compiled its sparse kernels in %.1f s", time.perf_counter() - start)


def cache_rows(key_cache: torch.Tensor, group) -> torch.Tensor:
    """[Tk] int64: where each key position of the group sits in the cache view, in elements;
    computed once per step (every layer's cache has the same strides)."""
    strides = key_cache.stride()
    rows = group.cache_rows.get(strides)
    if rows is None:
        rows = group.cache_rows[strides] = paged_rows(key_cache, group.kv_pages, group.kv_offsets)
    return rows


class FlexPrefillBackend(FlashAttentionBackend):
    supported_kv_cache_dtypes = ["auto", "bfloat16", "float16"]

    @staticmethod
    def get_name() -> str:
        return "FLEX_PREFILL"

    @staticmethod
    def get_impl_cls():
        return FlexPrefillImpl

    @staticmethod
    def get_builder_cls():
        return FlexPrefillMetadataBuilder

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        return False

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        # the sparse kernels read the cache as the model dtype; FP8 caches are refused at startup
        return kv_cache_dtype is None or kv_cache_dtype in cls.supported_kv_cache_dtypes


class FlexPrefillCustomBackend(FlexPrefillBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"
