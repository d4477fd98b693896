"""What the CPU and CUDA backends share: the layer's forward, and the FlexPrefill call."""

from __future__ import annotations

import logging

import torch

from vllm_flexprefill import stats
from vllm_flexprefill.attention import select_blocks, sparse_attention
from vllm_flexprefill.backend.compat import logger
from vllm_flexprefill.backend.routing import SparseGroup, SparsePlan


class FlexPrefillForward:
    """The forward of both impls (a mixin before vLLM's FlashAttention or CPU impl, whose
    ``forward`` runs the dense parts).

    Without a plan, or in a layer the plan keeps dense, the whole batch runs the dense
    forward (and a measuring layer then runs the estimation of each group alone, for the
    router). Otherwise the runs of dense requests run the dense forward on their slices
    and each group of long prefills runs FlexPrefill over all its key positions. Where a
    group's keys and values are read is the platform's (``group_keys``).
    """

    unsupported: str | None
    scale: float
    num_heads: int
    head_size: int

    def group_keys(self, index: int, group: SparseGroup, key, value, kv_cache, attn_metadata
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(k, v, k_rows) of every key position of the plan's group ``index``: [Tk, H, D]
        tensors, or a paged cache's views with the rows ``k_rows`` [Tk] to read them at."""
        raise NotImplementedError

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        dense = super().forward  # vLLM's impl, next in the method order
        plan: SparsePlan | None = getattr(attn_metadata, "plan", None)
        name = getattr(layer, "layer_name", "")
        if plan is None or self.unsupported or not plan.runs_sparse(name):
            dense(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
            if plan is not None and not self.unsupported and plan.measures(name):
                for i, group in enumerate(plan.groups):
                    k, _, k_rows = self.group_keys(i, group, key, value, kv_cache, attn_metadata)
                    choose_and_record(group_queries(query, group), k, group, plan, self.scale, name, k_rows)
            return output
        for t0, t1, md in attn_metadata.runs:
            dense(layer, query[t0:t1], key[t0:t1] if key is not None else None,
                  value[t0:t1] if value is not None else None, kv_cache, md, output[t0:t1])
        rows_out = output.view(output.shape[0], self.num_heads, self.head_size)
        for i, group in enumerate(plan.groups):
            k, v, k_rows = self.group_keys(i, group, key, value, kv_cache, attn_metadata)
            rows = group.q_rows
            contiguous = isinstance(rows, slice)
            new = {}
            if plan.kernel == "fa4" and k_rows is not None and key is not None and group.layout.fresh:
                # whole prompts: FA4 reads this step's own keys and values (no copy out of the cache)
                new = dict(k_new=group_queries(key, group), v_new=group_queries(value, group))
            out = sparse_prefill(group_queries(query, group), k, v, group, plan, self.scale,
                                 out=rows_out[rows] if contiguous else None, layer_name=name, k_rows=k_rows, **new)
            if not contiguous:
                rows_out.index_copy_(0, rows, out)
        return output


def group_queries(query: torch.Tensor, group: SparseGroup) -> torch.Tensor:
    """[Tq, HQ, D]: the query rows of a group's requests (also their new keys' and values')."""
    rows = group.q_rows
    return query[rows] if isinstance(rows, slice) else query.index_select(0, rows)


def sparse_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: SparseGroup, plan: SparsePlan,
                   scale: float, out: torch.Tensor | None = None, layer_name: str = "",
                   k_rows: torch.Tensor | None = None, k_new: torch.Tensor | None = None,
                   v_new: torch.Tensor | None = None) -> torch.Tensor:
    """FlexPrefill over one group's packed requests, with the plan's attention kernel.

    q: [Tq, HQ, D] their new tokens; k, v: [Tk, H, D] all their key positions, or the paged
    cache's views read at ``k_rows`` [Tk] (``attention.select_blocks``); k_new, v_new: their
    new keys and values [Tq, H, D] where every request is a whole prompt (or None).
    Returns out [Tq, HQ, D] (written in place when given).
    """
    selection = choose_and_record(q, k, group, plan, scale, layer_name, k_rows)
    if logger.isEnabledFor(logging.DEBUG):
        # a host synchronisation, only when debug logging asks for it
        density = selection.density(group.layout)
        logger.debug("FlexPrefill %s: requests %s new/all tokens %s density %.3f (per request %s), "
                     "query-aware heads %d", layer_name, group.requests,
                     [f"{a}/{b}" for a, b in zip(group.layout.q_lens, group.layout.k_lens)], density.mean().item(),
                     [round(x, 3) for x in density.mean(1).tolist()], int(selection.query_aware.sum()))
    if stats.path() is not None:
        record_layer(selection, group, layer_name, plan.kernel)
    return sparse_attention(q, k, v, group.layout, selection, scale, out=out, k_rows=k_rows, k_new=k_new, v_new=v_new,
                            kernel=plan.kernel)


def choose_and_record(q: torch.Tensor, k: torch.Tensor, group: SparseGroup, plan: SparsePlan, scale: float,
                      layer_name: str, k_rows: torch.Tensor | None = None):
    """The group's block selection, with this layer's settings (``layer_gamma``); its density
    goes to the router's memory (the block-list kernel adds to its counters: no
    synchronisation, no launch of its own). A layer that measures (``SparsePlan.measures``)
    calls this alone."""
    counter = None
    if plan.memory is not None:
        counter = plan.memory.counter(layer_name, group.bucket, group.causal_blocks * q.shape[1])
    cfg = plan.config.for_layer(stats.layer_index(layer_name))
    return select_blocks(q, k, group.layout, cfg, scale, k_rows, count_into=counter)


def record_layer(selection, group: SparseGroup, layer_name: str, kernel: str) -> None:
    """One statistics record for this layer call (a host synchronisation; only when asked for)."""
    layout = group.layout
    counts = selection.block_cnt.sum(0).tolist()  # [NQB] blocks over the heads
    heads = selection.block_cnt.shape[0]
    query_aware = selection.query_aware.sum(1).tolist()
    requests = []
    for s in range(layout.num_seqs):
        lo, hi = layout.first_tile[s], layout.first_tile[s + 1]
        requests.append({"new": layout.q_lens[s], "all": layout.k_lens[s], "computed": int(sum(counts[lo:hi])),
                         "causal": layout.causal_blocks_of(s) * heads, "query_aware": int(query_aware[s])})
    stats.append({"kind": "layer", "layer": layer_name, "heads": heads, "kernel": kernel, "requests": requests})
