"""Plain-PyTorch twins of the Triton kernels: float32, readable, slow. They are the spec."""

from __future__ import annotations

import torch

from vllm_flexprefill.patterns.layout import BatchLayout


def naive_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BatchLayout,
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention restricted to the listed key blocks of every (query head, tile).

    Args:
        q: [Tq, HQ, D]; k, v: [Tk, H, D] packed as ``layout`` says.
        block_idx: [HQ, NQB, NB] int32 sorted key-block ids, -1 padded.
        block_cnt: [HQ, NQB] int32.
    Returns:
        [Tq, HQ, D] in q's dtype.
    """
    bs = layout.block_size
    hq, group = q.shape[1], q.shape[1] // k.shape[1]
    out = torch.empty(q.shape[0], hq, v.shape[2], dtype=q.dtype, device=q.device)
    for s in range(layout.num_seqs):
        q_len, k_len = layout.q_lens[s], layout.k_lens[s]
        lo, hi = layout.first_tile[s], layout.first_tile[s + 1]
        nb = layout.num_key_blocks(s)
        q_pos = torch.arange(k_len - q_len, k_len, device=q.device)
        k_pos = torch.arange(k_len, device=q.device)
        # [HQ, R, NB] -> [HQ, q_len, k_len] token mask
        tile_mask = torch.zeros(hq, hi - lo, nb + 1, dtype=torch.bool, device=q.device)
        ids = block_idx[:, lo:hi, :].long()
        in_list = torch.arange(ids.shape[-1], device=q.device) < block_cnt[:, lo:hi, None]
        tile_mask.scatter_(-1, torch.where(in_list & (ids >= 0), ids, nb), True)
        tile_of_query = q_pos // bs - layout.first_row(s)
        token_mask = tile_mask[:, tile_of_query][:, :, k_pos // bs]
        token_mask &= k_pos[None, None, :] <= q_pos[None, :, None]
        qs = q[layout.q_range(s)].float().transpose(0, 1)
        ks = k[layout.k_range(s)].float().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[layout.k_range(s)].float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (scale * qs @ ks.transpose(1, 2)).masked_fill(~token_mask, float("-inf"))
        out[layout.q_range(s)] = (torch.softmax(scores, dim=-1) @ vs).transpose(0, 1).to(q.dtype)
    return out


def naive_probe_stats(
    q_probe: torch.Tensor, k: torch.Tensor, block_size: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(key block, probe row) softmax statistics of the probe queries of one sequence.

    Args:
        q_probe: [NP, HQ, D] the last NP queries (positions k_len-NP .. k_len-1).
        k: [k_len, H, D] all keys of the sequence.
    Returns:
        m, l: [HQ, NB, BS] float32. ``m[h, c, i]`` is the largest causal score of probe row
        i in key block c (-inf if none), ``l[h, c, i]`` the sum of ``exp(score - m)``.
        Rows i >= NP are padding (m = -inf, l = 0).
    """
    n_probe, hq, _ = q_probe.shape
    k_len, group = k.shape[0], hq // k.shape[1]
    nb = -(-k_len // block_size)
    probe_pos = torch.arange(k_len - n_probe, k_len, device=k.device)
    key_pos = torch.arange(nb * block_size, device=k.device)
    keys = torch.zeros(nb * block_size, hq, k.shape[2], device=k.device)
    keys[:k_len] = k.float().repeat_interleave(group, dim=1)
    scores = scale * torch.einsum("ihd,jhd->hij", q_probe.float(), keys)
    scores = scores.masked_fill((key_pos[None, :] > probe_pos[:, None]) | (key_pos[None, :] >= k_len), float("-inf"))
    scores = scores.view(hq, n_probe, nb, block_size).transpose(1, 2)  # [HQ, NB, NP, BS]
    m = scores.amax(-1)
    l = torch.exp(scores - torch.where(torch.isinf(m), 0.0, m)[..., None]).sum(-1)
    pad = block_size - n_probe
    m = torch.nn.functional.pad(m, (0, pad), value=float("-inf"))
    l = torch.nn.functional.pad(l, (0, pad), value=0.0)
    return m, l


def naive_block_mask(
    first_row: int, num_rows: int, nb: int,
    keep_v: torch.Tensor | None = None, keep_s: torch.Tensor | None = None,
    pooled: torch.Tensor | None = None, threshold: torch.Tensor | None = None,
    query_aware: torch.Tensor | None = None, dense_from: int | None = None,
) -> torch.Tensor:
    """Twin of ``kernels.block_lists.write_block_lists`` as a mask: [HQ, R, NB] bool
    (``mask_to_lists`` turns it into the lists). Same arguments; keep_v None means dense."""
    device = keep_v.device if keep_v is not None else "cpu"
    rows = torch.arange(first_row, first_row + num_rows, device=device)
    cols = torch.arange(nb, device=device)
    diff = rows[:, None] - cols[None, :]
    causal = diff >= 0
    if keep_v is None:
        return causal[None]
    offsets = keep_s[:, diff.clamp_min(0)]  # [HQ, R, NB]
    mask = causal & (keep_v[:, None, :] | offsets)
    if pooled is not None:
        chosen = pooled.view(-1, num_rows, nb) >= threshold[:, None, None]
        mask |= causal & chosen & query_aware[:, None, None]
    if dense_from is not None:
        mask |= causal & (rows >= dense_from)[:, None]
    return mask


def naive_coverage_threshold(pooled: torch.Tensor, query_aware: torch.Tensor, target: float) -> torch.Tensor:
    """Twin of ``kernels.block_lists.coverage_threshold``: the smallest value of the
    shortest descending prefix whose mass reaches ``target`` (2 for heads that are not
    query-aware)."""
    values = torch.sort(pooled.float(), dim=-1, descending=True).values
    before = torch.cumsum(values, -1) - values
    count = (before < target).sum(-1).clamp_min(1)
    crossing = torch.gather(values, -1, (count - 1)[:, None])[:, 0]
    return torch.where(query_aware, crossing, 2.0)
