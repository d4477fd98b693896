"""FlexPrefill pattern estimation batched over heads, for the GPU.

The same selection as ``patterns/naive.py`` (the spec), computed for all query heads of a
sequence at once: the probe statistics come from ``kernels/probe.py``, the query-aware
threshold and the block lists from ``kernels/block_lists.py``. No host synchronisation
and no Python loop over heads. Sequences are visited in a host loop; only sparse-eligible
(long) sequences get here, so a batch holds few of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from vllm_flexprefill.config import FlexPrefillConfig
from vllm_flexprefill.kernels.block_lists import coverage_threshold, write_block_lists
from vllm_flexprefill.kernels.head_select import select_heads
from vllm_flexprefill.patterns.coverage import coverage_select, js_distance
from vllm_flexprefill.patterns.layout import BatchLayout, BlockSelection

ProbeFn = Callable[[torch.Tensor, torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor]]


def block_means(x: torch.Tensor, block_size: int, offset: int = 0) -> torch.Tensor:
    """[L, H, D] -> [NB, H, D] float32 means over the blocks of a grid on which x starts
    ``offset`` tokens into its first block (partial first/last blocks are true means).

    Sums accumulate in float32 without copying x to float32.
    """
    n = x.shape[0]
    head = min(n, (block_size - offset) % block_size)  # tokens in a partial first block
    parts = []
    if head:
        parts.append(x[:head].sum(0, keepdim=True, dtype=torch.float32) / head)
    full = (n - head) // block_size
    if full:
        body = x[head:head + full * block_size].view(full, block_size, *x.shape[1:])
        parts.append(body.sum(1, dtype=torch.float32) / block_size)
    tail = n - head - full * block_size
    if tail:
        parts.append(x[n - tail:].sum(0, keepdim=True, dtype=torch.float32) / tail)
    return torch.cat(parts)


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


@dataclasses.dataclass(frozen=True)
class SequenceChoice:
    """What the estimation chose for one sequence (all heads).

    keep_v, keep_s: [HQ, NB] bool, chosen key blocks (verticals) and block offsets (slashes).
    pooled: [HQ, R * NB] float32 pooled block map of the chunk's tiles, or None when tau = 0.
    threshold: [HQ] float32, query-aware heads keep ``pooled >= threshold`` (2 for the others).
    query_aware: [HQ] bool.
    """

    keep_v: torch.Tensor
    keep_s: torch.Tensor
    pooled: torch.Tensor | None
    threshold: torch.Tensor | None
    query_aware: torch.Tensor


def probe_row(q_len: int, k_len: int, block_size: int) -> int:
    """The first block row holding a probe query: from it on, tiles attend to every key.

    The probe's rows are the end of the prompt (in a prompt: the question), whose attention
    makes the first answer token; computing them densely costs one or two rows of blocks.
    """
    return (k_len - min(block_size, q_len)) // block_size


def estimate_sequence(
    q: torch.Tensor, k: torch.Tensor, cfg: FlexPrefillConfig, scale: float, probe: ProbeFn, fused: bool = False
) -> SequenceChoice:
    """Chooses blocks for every query head of one sequence.

    Args:
        q: [q_len, HQ, D] the sequence's queries (last q_len of k_len positions).
        k: [k_len, H, D] its keys.
        probe: ``kernels.probe.probe_stats`` or its naive twin.
        fused: choose verticals and slashes with ``kernels.head_select`` (one launch)
            instead of the PyTorch twin (about a hundred).
    """
    bs = cfg.sparse_block_size
    q_len, hq, _ = q.shape
    k_len, group = k.shape[0], hq // k.shape[1]
    nb = -(-k_len // bs)
    first_row = (k_len - q_len) // bs
    dev = q.device

    n_probe = min(bs, q_len)
    q_probe = q[q_len - n_probe:]
    m, l = probe(q_probe, k, bs, scale)
    k_block_means = block_means(k, bs)  # [NB, H, D]
    q_probe_bar = q_probe.mean(0, dtype=torch.float32)  # [HQ, D]
    max_blocks = cfg.max_blocks or nb
    qa_count = min(cfg.min_blocks, max_blocks)
    select = select_heads if fused else select_heads_torch
    keep_v, keep_s, query_aware = select(m, l, k_block_means, q_probe_bar, n_probe, k_len, scale,
                                         cfg.gamma, cfg.tau, cfg.min_blocks, max_blocks, qa_count)
    if cfg.tau == 0:
        return SequenceChoice(keep_v, keep_s, None, None, query_aware)
    k_bar = k_block_means.repeat_interleave(group, dim=1)  # [NB, HQ, D]

    # pooled block map of the chunk's query tiles; query-aware heads keep its top gamma
    cols = torch.arange(nb, device=dev)
    rows = torch.arange(first_row, nb, device=dev)
    r = len(rows)
    q_bar = block_means(q, bs, offset=(k_len - q_len) % bs)  # [R, HQ, D]
    logits = scale * torch.einsum("rhd,chd->hrc", q_bar, k_bar)
    logits = logits.masked_fill(cols[None, None, :] > rows[None, :, None], float("-inf"))
    pooled = torch.softmax(logits, dim=-1).view(hq, r * nb)
    threshold = coverage_threshold(pooled, query_aware, cfg.gamma * r)
    return SequenceChoice(keep_v, keep_s, pooled, threshold, query_aware)


def select_heads_torch(
    m: torch.Tensor, l: torch.Tensor, k_block_means: torch.Tensor, q_probe_bar: torch.Tensor, n_probe: int,
    k_len: int, scale: float, gamma: float, tau: float, min_blocks: int, max_blocks: int, qa_blocks: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch twin of ``kernels.head_select.select_heads`` (same arguments):
    keep_v, keep_s [HQ, NB], query_aware [HQ]."""
    hq, nb, bs = m.shape
    vertical, slash = probe_masses(m, l, n_probe, k_len, bs)
    k_bar = k_block_means.repeat_interleave(hq // k_block_means.shape[1], dim=1)
    estimate = torch.softmax(scale * torch.einsum("hd,chd->hc", q_probe_bar, k_bar), dim=-1)
    query_aware = js_distance(estimate, vertical) < tau  # [HQ]
    min_count = torch.where(query_aware, qa_blocks, min_blocks)
    max_count = torch.where(query_aware, qa_blocks, max_blocks)
    # verticals and slashes in one call: [2, HQ, NB]
    valid = torch.ones(2, hq, nb, dtype=torch.bool, device=m.device)
    forced = (torch.arange(nb, device=m.device) == 0).expand(2, hq, nb)
    keep = coverage_select(torch.stack([vertical, slash]), valid, forced, gamma, min_count, max_count)
    return keep[0], keep[1], query_aware


def select_blocks(
    q: torch.Tensor, k: torch.Tensor, layout: BatchLayout, cfg: FlexPrefillConfig, scale: float, probe: ProbeFn,
    fused: bool = False,
) -> BlockSelection:
    """Block lists for a packed batch: estimated for sparse sequences, every causal block for the rest.

    Args:
        q: [Tq, HQ, D]; k: [Tk, H, D] packed as ``layout`` says.
    """
    hq = q.shape[1]
    block_idx = torch.full((hq, layout.num_tiles, layout.max_key_blocks), -1, dtype=torch.int32, device=q.device)
    block_cnt = torch.empty(hq, layout.num_tiles, dtype=torch.int32, device=q.device)
    query_aware = torch.zeros(layout.num_seqs, hq, dtype=torch.bool, device=q.device)
    for s in range(layout.num_seqs):
        where = dict(first_tile=layout.first_tile[s], first_row=layout.first_row(s),
                     num_rows=layout.first_tile[s + 1] - layout.first_tile[s], nb=layout.num_key_blocks(s))
        if layout.sparse[s]:
            choice = estimate_sequence(q[layout.q_range(s)], k[layout.k_range(s)], cfg, scale, probe, fused)
            query_aware[s] = choice.query_aware
            write_block_lists(block_idx, block_cnt, **where, keep_v=choice.keep_v, keep_s=choice.keep_s,
                              pooled=choice.pooled, threshold=choice.threshold, query_aware=choice.query_aware,
                              dense_from=probe_row(layout.q_lens[s], layout.k_lens[s], cfg.sparse_block_size))
        else:
            write_block_lists(block_idx, block_cnt, **where)
    return BlockSelection(block_idx, block_cnt, query_aware)
