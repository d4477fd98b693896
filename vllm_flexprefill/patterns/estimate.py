"""FlexPrefill pattern estimation batched over heads and requests: the GPU's path, composed of operations.

The same selection as ``patterns/naive.py`` (the spec), computed for all query heads of
all sparse sequences of a batch at once from four operations (``EstimationOps``), each one
launch however many requests the batch holds: probe statistics and block means, the
per-head vertical/slash choice and pattern test, the query-aware heads' pooled maps and
their thresholds (only when tau > 0), and the block lists of every tile. ``attention.py`` passes
either the Triton kernels or their PyTorch twins (``kernels/``); this module imports
neither. No host synchronisation and no Python loop over heads or requests: each kernel
reads its sequence's lengths and offsets from ``BatchLayout.sparse_seqs()``, made once per
step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from vllm_flexprefill.config import FlexPrefillConfig
from vllm_flexprefill.patterns.layout import BatchLayout, BlockSelection
from vllm_flexprefill.patterns.workspace import buffers


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


def probe_masses(
    m: torch.Tensor, l: torch.Tensor, n_probe: int, k_len: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical and slash block masses from the probe statistics.

    Args:
        m, l: [HQ, NB, BS] per-(key block, probe row) maximum and sum of exponentials.
    Returns:
        vertical [HQ, NB] (mass per key block) and slash [HQ, NB] (mass per block offset
        row - col), each summing to 1 per head.
    """
    hq, nb, bs = m.shape
    # each probe row's log-sum-exp over all key blocks
    log_l = torch.where(l > 0, torch.log(l.clamp_min(1e-38)), float("-inf"))
    lse = torch.logsumexp(m + log_l, dim=1, keepdim=True)
    weight = torch.where(l > 0, l * torch.exp(m - torch.where(torch.isinf(lse), 0.0, lse)), 0.0)
    weight = weight / n_probe
    vertical = weight.sum(-1)
    rows = torch.arange(bs, device=m.device)
    row_block = (k_len - n_probe + rows) // block_size
    offset = row_block[None, :] - torch.arange(nb, device=m.device)[:, None]  # [NB, BS]
    offset = torch.where((offset >= 0) & (rows < n_probe)[None, :], offset, nb)
    slash = torch.zeros(hq, nb + 1, device=m.device)
    slash.scatter_add_(1, offset.flatten().expand(hq, -1), weight.flatten(1))
    return vertical, slash[:, :nb]


def probe_row(q_len: int, k_len: int, block_size: int) -> int:
    """The first block row holding a probe query: from it on, tiles attend to every key.

    The probe's rows are the end of the prompt (in a prompt: the question), whose attention
    makes the first answer token; computing them densely costs one or two rows of blocks.
    """
    return (k_len - min(block_size, q_len)) // block_size


def estimate_blocks(
    q: torch.Tensor, k: torch.Tensor, layout: BatchLayout, cfg: FlexPrefillConfig, scale: float, ops: EstimationOps,
    k_rows: torch.Tensor | None = None, count_into: torch.Tensor | None = None,
) -> BlockSelection:
    """Block lists for a packed batch: estimated for sparse sequences, every causal block for the rest.

    Args:
        q: [Tq, HQ, D]; k: [Tk, H, D] packed as ``layout`` says, or a paged cache view
            with ``k_rows`` [Tk] (element offset of each key position's row in k).
        count_into: optional int32 counters that the lists' lengths are added to
            (``write_block_lists``).
    """
    hq = q.shape[1]
    ws = buffers(layout)
    # every entry is written by write_block_lists (ids, then -1): no fill
    block_idx = ws.empty("lists.idx", (hq, layout.num_tiles, layout.max_key_blocks), torch.int32, q.device)
    block_cnt = ws.empty("lists.cnt", (hq, layout.num_tiles), torch.int32, q.device)
    if not any(layout.sparse):
        ops.write_block_lists(block_idx, block_cnt, layout, count_into=count_into)
        return BlockSelection(block_idx, block_cnt, torch.zeros(layout.num_seqs, hq, dtype=torch.bool,
                                                                device=q.device))
    m, l, k_bar, q_probe_bar = ops.probe(q, k, layout, scale, k_rows=k_rows)
    keep_v, keep_s, query_aware = ops.select_heads(m, l, k_bar, q_probe_bar, layout, scale, cfg.gamma, cfg.tau,
                                                   cfg.min_blocks, cfg.max_blocks)
    pooled = threshold = None
    if cfg.tau > 0:
        # query-aware heads keep the blocks of their pooled map that cover gamma of its mass
        pooled, threshold = ops.pooled_map(q, k_bar, query_aware, layout, scale, cfg.gamma)
    ops.write_block_lists(block_idx, block_cnt, layout, keep_v, keep_s, query_aware, pooled, threshold,
                          count_into=count_into)
    # the kernels' 0/1 int8 flags read as bool without a conversion launch
    return BlockSelection(block_idx, block_cnt, query_aware.view(torch.bool))
