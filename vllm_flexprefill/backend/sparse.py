"""The FlexPrefill call shared by the CPU and CUDA backends."""

from __future__ import annotations

import logging

import torch

from vllm_flexprefill import stats
from vllm_flexprefill.attention import select_blocks, sparse_attention
from vllm_flexprefill.backend.compat import logger
from vllm_flexprefill.backend.routing import SparseGroup, SparsePlan


def sparse_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: SparseGroup, plan: SparsePlan,
                   scale: float, out: torch.Tensor | None = None, layer_name: str = "",
                   k_rows: torch.Tensor | None = None) -> torch.Tensor:
    """FlexPrefill over one group's packed requests.

    q: [Tq, HQ, D] their new tokens; k, v: [Tk, H, D] all their key positions, or the paged
    cache's views read at ``k_rows`` [Tk] (``attention.select_blocks``).
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
        record_layer(selection, group, layer_name)
    return sparse_attention(q, k, v, group.layout, selection, scale, out=out, k_rows=k_rows)


def choose_and_record(q: torch.Tensor, k: torch.Tensor, group: SparseGroup, plan: SparsePlan, scale: float,
                      layer_name: str, k_rows: torch.Tensor | None = None):
    """The group's block selection; its density goes to the router's memory (the block-list
    kernel adds to its counters: no synchronisation, no launch of its own). A layer that
    measures (``SparsePlan.measures``) calls this alone."""
    counter = None
    if plan.memory is not None:
        counter = plan.memory.counter(layer_name, group.bucket, group.causal_blocks * q.shape[1])
    return select_blocks(q, k, group.layout, plan.config, scale, k_rows, count_into=counter)


def record_layer(selection, group: SparseGroup, layer_name: str) -> None:
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
    stats.append({"kind": "layer", "layer": layer_name, "heads": heads, "requests": requests})
