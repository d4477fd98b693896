"""FlexPrefill pattern estimation in plain PyTorch: the readable specification.

One sequence and one query head at a time, in float32. ``estimate.py`` computes the same
selection batched over heads and sequences on the GPU; tests hold the two together.

Per query head of a sparse sequence (see docs/algorithm.md for the symbols):

1. Probe: the last ``min(BS, q_len)`` queries attend causally to all keys (softmax with
   the layer's scale).
2. Vertical mass of key block c: the probe's attention that falls in block c. Slash mass
   of block offset s: the probe's attention that falls on block diagonal ``row - col = s``.
   Both sum to 1 (averaged over the probe rows).
3. Pattern test: the Jensen-Shannon distance between the pooled estimate
   ``softmax(scale * mean(q_probe) . mean_block(k))`` and the vertical block mass. Below
   ``tau`` the head is query-aware.
4. Vertical-slash heads keep the vertical blocks covering ``gamma`` of the vertical mass
   and the offsets covering ``gamma`` of the slash mass, within [min_budget, max_budget];
   query-aware heads keep only ``min_budget`` of each plus the blocks of the pooled
   block map ``softmax_c(scale * mean_block(q)_r . mean_block(k)_c)`` that cover ``gamma``
   of its total mass. The sink block (c = 0) and the diagonal (s = 0) are always kept.
5. The query tiles holding the probe rows keep every causal block: the end of a prompt
   (its question) attends exactly, and the first answer token is made from it.
"""

from __future__ import annotations

import torch

from vllm_flexprefill.config import FlexPrefillConfig
from vllm_flexprefill.layout.batch import BatchLayout
from vllm_flexprefill.layout.lists import BlockSelection, causal_mask, selection_from_mask
from vllm_flexprefill.patterns.coverage import coverage_select, js_distance
from vllm_flexprefill.patterns.masses import block_means, probe_row


def naive_lines(
    q_probe: torch.Tensor, k: torch.Tensor, cfg: FlexPrefillConfig, scale: float
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Steps 1-4 for one query head: the chosen vertical blocks and slash offsets.

    Args:
        q_probe: [NP, D] the head's last NP = min(BS, q_len) queries (positions k_len-NP ..).
        k: [k_len, D] the keys of its kv head.
    Returns:
        keep_v [NB] bool (key blocks), keep_s [NB] bool (block offsets row - col), query_aware.
    """
    bs = cfg.sparse_block_size
    n_probe, k_len = q_probe.shape[0], k.shape[0]
    nb = -(-k_len // bs)
    cols = torch.arange(nb)
    q_probe = q_probe.float()
    k = k.float()

    # 1. probe attention of the last queries
    probe_pos = torch.arange(k_len - n_probe, k_len)
    key_pos = torch.arange(k_len)
    scores = scale * q_probe @ k.T
    scores = scores.masked_fill(key_pos[None, :] > probe_pos[:, None], float("-inf"))
    attn = torch.softmax(scores, dim=-1)

    # 2. vertical mass per key block, slash mass per block offset
    col_block = key_pos // bs
    offset = (probe_pos // bs)[:, None] - col_block[None, :]
    vertical = torch.zeros(nb).index_add_(0, col_block, attn.sum(0)) / n_probe
    slash = torch.zeros(nb).index_add_(0, offset.clamp_min(0).flatten(), attn.flatten()) / n_probe

    # 3. pattern test against the pooled estimate
    estimate = torch.softmax(scale * q_probe.mean(0) @ block_means(k[:, None], bs)[:, 0].T, dim=-1)
    query_aware = bool(js_distance(estimate, vertical) < cfg.tau)

    # 4. budgets
    valid = torch.ones(nb, dtype=torch.bool)
    max_blocks = cfg.max_blocks or nb
    if query_aware:
        budget = (min(cfg.min_blocks, max_blocks), min(cfg.min_blocks, max_blocks))
    else:
        budget = (cfg.min_blocks, max_blocks)
    keep_v = coverage_select(vertical, valid, cols == 0, cfg.gamma, budget[0], budget[1])
    keep_s = coverage_select(slash, valid, cols == 0, cfg.gamma, budget[0], budget[1])
    return keep_v, keep_s, query_aware


def naive_head_selection(
    q: torch.Tensor, k: torch.Tensor, k_len: int, cfg: FlexPrefillConfig, scale: float
) -> tuple[torch.Tensor, bool]:
    """Selects the blocks of one query head of one sequence.

    Args:
        q: [q_len, D] this head's queries (the last q_len of the k_len positions).
        k: [k_len, D] the keys of this head's kv head.
    Returns:
        ([R, NB] bool block mask for the R query tiles of the chunk, query_aware).
    """
    bs = cfg.sparse_block_size
    q_len = q.shape[0]
    nb = -(-k_len // bs)
    first_row = (k_len - q_len) // bs
    rows = torch.arange(first_row, nb)
    cols = torch.arange(nb)
    n_probe = min(bs, q_len)
    keep_v, keep_s, query_aware = naive_lines(q[q_len - n_probe:], k, cfg, scale)

    diff = rows[:, None] - cols[None, :]
    causal = diff >= 0
    mask = causal & (keep_v[None, :] | keep_s[diff.clamp_min(0)])
    if query_aware:
        # pooled block map over the chunk's query tiles, selected globally
        q_bar = block_means(q[:, None], bs, offset=(k_len - q_len) % bs)[:, 0]  # [R, D], one per tile
        logits = (scale * q_bar @ block_means(k[:, None], bs)[:, 0].T).masked_fill(~causal, float("-inf"))
        pooled = torch.softmax(logits, dim=-1)
        keep_qa = coverage_select(pooled.flatten(), causal.flatten(), torch.zeros_like(causal.flatten()),
                                  cfg.gamma, 0, causal.numel())
        mask |= keep_qa.view_as(mask)
    # 5. the tiles holding the probe (the last BS queries) attend to every key
    mask |= causal & (rows >= probe_row(q_len, k_len, bs))[:, None]
    return mask, query_aware


def naive_select_blocks(
    q: torch.Tensor, k: torch.Tensor, layout: BatchLayout, cfg: FlexPrefillConfig, scale: float
) -> BlockSelection:
    """Selects blocks for a packed batch, one sequence and head at a time.

    Args:
        q: [Tq, HQ, D]; k: [Tk, H, D] with HQ a multiple of H (query head h reads kv head h // G).
    """
    hq, h_kv = q.shape[1], k.shape[1]
    group = hq // h_kv
    mask = causal_mask(layout, hq)
    query_aware = torch.zeros(layout.num_seqs, hq, dtype=torch.bool, device=q.device)
    for s in range(layout.num_seqs):
        if not layout.sparse[s]:
            continue
        nb = layout.num_key_blocks(s)
        tiles = slice(layout.first_tile[s], layout.first_tile[s + 1])
        for h in range(hq):
            head_mask, qa = naive_head_selection(
                q[layout.q_range(s), h].cpu(), k[layout.k_range(s), h // group].cpu(), layout.k_lens[s],
                cfg, scale)
            mask[h, tiles, :nb] = head_mask.to(mask.device)
            mask[h, tiles, nb:] = False
            query_aware[s, h] = qa
    return selection_from_mask(mask, layout, query_aware)
