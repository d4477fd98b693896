"""FlexPrefill's pattern estimation, batched over heads and requests: one pipeline of four
operations for CPU and GPU.

The same selection as the per-head specification (``patterns/naive.py``, the tests' oracle),
computed for all query heads of all sparse sequences of a batch at once from four operations
(``EstimationOps``), each one launch however many requests the batch holds: probe statistics
and block means, the per-head vertical/slash choice and pattern test, the query-aware heads'
pooled maps and their thresholds (only when tau > 0), and the block lists of every tile.
CUDA tensors run the Triton kernels (``kernels/``), CPU tensors their plain-PyTorch twins
(``kernels/naive.py``), which take the same arguments. No host synchronisation and no Python
loop over heads or requests: each kernel reads its sequence's lengths and offsets from
``BatchLayout.sparse_seqs()``, made once per step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch

from vllm_flexprefill.config import FlexPrefillConfig
from vllm_flexprefill.layout.batch import BatchLayout
from vllm_flexprefill.layout.lists import BlockSelection
from vllm_flexprefill.layout.workspace import buffers


@dataclasses.dataclass(frozen=True)
class EstimationOps:
    """The operations of the estimation; each Triton kernel and its twin share a signature.

    probe: ``kernels.probe.probe_stats``; select_heads: ``kernels.head_select.select_heads``;
    pooled_map (maps and thresholds), write_block_lists: ``kernels.block_lists``. Each takes
    the batch's ``BatchLayout`` and serves all its sequences.
    """

    probe: Callable
    select_heads: Callable
    pooled_map: Callable
    write_block_lists: Callable


@functools.cache
def triton_ops() -> EstimationOps:
    """The estimation's Triton kernels (the GPU path)."""
    from vllm_flexprefill.kernels.block_lists import pooled_map, write_block_lists
    from vllm_flexprefill.kernels.head_select import select_heads
    from vllm_flexprefill.kernels.probe import probe_stats

    return EstimationOps(probe_stats, select_heads, pooled_map, write_block_lists)


@functools.cache
def torch_ops() -> EstimationOps:
    """The kernels' plain-PyTorch twins (the CPU path; the tests hold the two together)."""
    from vllm_flexprefill.kernels import naive

    return EstimationOps(naive.naive_probe_stats, naive.naive_select_heads, naive.naive_pooled_map,
                         naive.naive_write_block_lists)


def ops_for(t: torch.Tensor) -> EstimationOps:
    """The Triton kernels for CUDA tensors, their twins elsewhere."""
    return triton_ops() if t.is_cuda else torch_ops()


def estimate_blocks(
    q: torch.Tensor, k: torch.Tensor, layout: BatchLayout, cfg: FlexPrefillConfig, scale: float,
    k_rows: torch.Tensor | None = None, count_into: torch.Tensor | None = None, ops: EstimationOps | None = None,
) -> BlockSelection:
    """Block lists for a packed batch: estimated for sparse sequences, every causal block for the rest.

    Args:
        q: [Tq, HQ, D]; k: [Tk, H, D] packed as ``layout`` says, or a paged cache view
            with ``k_rows`` [Tk] (element offset of each key position's row in k).
        count_into: optional int32 counters that the lists' lengths are added to
            (``write_block_lists``).
        ops: the operations to run (default: ``ops_for(q)``).
    """
    ops = ops or ops_for(q)
    hq = q.shape[1]
    ws = buffers(layout)
    # every entry is written by write_block_lists (ids, then -1): no fill
    block_idx = ws.empty("lists.idx", (hq, layout.list_size), torch.int32, q.device)
    block_cnt = ws.empty("lists.cnt", (hq, layout.num_tiles), torch.int32, q.device)
    off_diagonal = ws.empty("lists.off_diagonal", (hq, layout.num_tiles), torch.int32, q.device)
    if not any(layout.sparse):
        ops.write_block_lists(block_idx, block_cnt, off_diagonal, layout, count_into=count_into)
        query_aware = ws.zeros("lists.query_aware", (layout.num_seqs, hq), torch.bool, q.device)
        return BlockSelection(block_idx, block_cnt, off_diagonal, query_aware)
    m, l, k_bar, q_probe_bar = ops.probe(q, k, layout, scale, k_rows=k_rows)
    keep_v, keep_s, query_aware = ops.select_heads(m, l, k_bar, q_probe_bar, layout, scale, cfg.gamma, cfg.tau,
                                                   cfg.min_blocks, cfg.max_blocks)
    pooled = threshold = None
    if cfg.tau > 0:
        # query-aware heads keep the blocks of their pooled map that cover gamma of its mass
        pooled, threshold = ops.pooled_map(q, k_bar, query_aware, layout, scale, cfg.gamma)
    ops.write_block_lists(block_idx, block_cnt, off_diagonal, layout, keep_v, keep_s, query_aware, pooled, threshold,
                          count_into=count_into)
    # the kernels' 0/1 int8 flags read as bool without a conversion launch
    return BlockSelection(block_idx, block_cnt, off_diagonal, query_aware.view(torch.bool))
