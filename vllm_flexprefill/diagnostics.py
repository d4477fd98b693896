"""Attention recall: how much of dense attention the chosen blocks keep.

For one sequence, ``block_mass`` computes the dense causal attention of every query and
sums it per (query head, query tile, key block); ``recall`` then says, per head, which
share of that mass falls inside the blocks FlexPrefill chose. A head whose queries lose
mass computes a different output; a needle whose block the final query tile does not
keep cannot be retrieved. Plain PyTorch in float32, in slices of queries: a diagnostic,
not a kernel.
"""

from __future__ import annotations

import torch

from vllm_flexprefill.patterns.layout import BatchLayout, BlockSelection


def block_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float, rows: int = 512) -> torch.Tensor:
    """Dense causal attention mass per (query head, query tile, key block) of one sequence.

    Args:
        q: [q_len, HQ, D] the last q_len queries of the k_len positions; k: [k_len, H, D].
        rows: queries per slice (bounds the [HQ, rows, k_len] float32 score buffer).
    Returns:
        [HQ, R, NB] float32; R query tiles on the block grid (``patterns/layout.py``), each
        entry the summed attention probability of the tile's queries in that key block
        (a tile's row sums to its number of queries).
    """
    q_len, hq, _ = q.shape
    k_len, group = k.shape[0], hq // k.shape[1]
    nb = -(-k_len // block_size)
    first_row = (k_len - q_len) // block_size
    out = torch.zeros(hq, nb - first_row, nb, dtype=torch.float32, device=q.device)
    keys = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [HQ, K, D]
    key_pos = torch.arange(k_len, device=q.device)
    key_block = key_pos // block_size
    for start in range(0, q_len, rows):
        pos = torch.arange(k_len - q_len + start, k_len - q_len + min(q_len, start + rows), device=q.device)
        scores = scale * torch.einsum("qhd,hkd->hqk", q[start:start + len(pos)].float(), keys)
        scores = scores.masked_fill(key_pos[None, None, :] > pos[None, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # [HQ, rows, K]
        per_block = torch.zeros(hq, len(pos), nb, device=q.device).index_add_(2, key_block, probs)
        tile = pos // block_size - first_row
        out.index_add_(1, tile, per_block)
    return out


def kept_mask(selection: BlockSelection, layout: BatchLayout, seq: int) -> torch.Tensor:
    """[HQ, R, NB] bool: the blocks each (head, tile) of sequence ``seq`` computes."""
    lo, hi = layout.first_tile[seq], layout.first_tile[seq + 1]
    nb = layout.num_key_blocks(seq)
    idx = selection.block_idx[:, lo:hi].long()
    listed = torch.arange(idx.shape[-1], device=idx.device) < selection.block_cnt[:, lo:hi, None]
    mask = torch.zeros(idx.shape[0], hi - lo, nb + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, torch.where(listed & (idx >= 0), idx, nb), True)
    return mask[..., :nb]


def recall(mass: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[HQ] share of the dense attention mass inside the kept blocks (``mass``, ``kept`` [HQ, R, NB])."""
    return (mass * kept).sum((1, 2)) / mass.sum((1, 2)).clamp_min(1e-30)
