"""Building the per-(query head, query tile) key-block lists of one sequence in one pass.

A tile at block row ``r`` keeps key block ``c <= r`` when column c is a chosen vertical,
when offset ``r - c`` is a chosen slash, or (query-aware heads only) when the pooled
block map ``P[r, c]`` reaches the head's threshold. Dense sequences, and the tiles from
row ``dense_from`` on (those holding the probe queries), keep every ``c <= r``.
One program per (tile, head) compacts the chosen ids with a prefix sum.

Also here, for the query-aware heads: their pooled block map (the softmax of mean query
tile . key block mean over each tile's causal blocks) and the per-head threshold of its
coverage, found by bisection so that no sort over the whole block map is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_flexprefill.kernels.configs import interpreted
from vllm_flexprefill.kernels.launch import launcher


# lengths, and the strides that follow them, vary per call: not specialised on, so one compilation
# serves every prompt (a new variant would compile in the middle of serving)
@triton.jit(do_not_specialize=["first_row", "first_tile", "nb", "dense_from", "stride_vh", "stride_ph", "stride_pr",
                               "stride_ih", "stride_it", "stride_ch"])
def block_lists_kernel(
    keep_v, keep_s, pooled, threshold, query_aware, block_idx, block_cnt,
    first_row, first_tile, nb, dense_from,
    stride_vh, stride_ph, stride_pr, stride_ih, stride_it, stride_ch,
    DENSE: tl.constexpr, HAS_POOLED: tl.constexpr, BC: tl.constexpr,
):
    i_r = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    row = first_row + i_r
    p_out = block_idx + i_h * stride_ih + (first_tile + i_r) * stride_it
    if HAS_POOLED:
        # a per-lane copy of the head's flag, so it combines with lane masks
        qa = (tl.zeros([BC], dtype=tl.int32) + tl.load(query_aware + i_h).to(tl.int32)) != 0
        thr = tl.load(threshold + i_h)
    n = 0
    all_causal = row >= dense_from
    for c0 in range(0, row + 1, BC):
        o_c = c0 + tl.arange(0, BC)
        m_c = o_c <= row
        if DENSE:
            sel = m_c
        elif all_causal:
            sel = m_c
        else:
            b_v = tl.load(keep_v + i_h * stride_vh + o_c, mask=m_c, other=0) != 0
            b_s = tl.load(keep_s + i_h * stride_vh + (row - o_c), mask=m_c, other=0) != 0
            sel = (b_v | b_s) & m_c
            if HAS_POOLED:
                b_p = tl.load(pooled + i_h * stride_ph + i_r * stride_pr + o_c, mask=m_c & qa, other=0.0)
                sel = sel | ((b_p >= thr) & m_c & qa)
        b_sel = sel.to(tl.int32)
        pos = n + tl.cumsum(b_sel, axis=0) - 1
        tl.store(p_out + pos, o_c.to(tl.int32), mask=sel)
        n += tl.sum(b_sel, axis=0)
    tl.store(block_cnt + i_h * stride_ch + first_tile + i_r, n)


def write_block_lists(
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor,
    first_tile: int,
    first_row: int,
    num_rows: int,
    nb: int,
    keep_v: torch.Tensor | None = None,
    keep_s: torch.Tensor | None = None,
    pooled: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    query_aware: torch.Tensor | None = None,
    dense_from: int | None = None,
) -> None:
    """Writes the lists of one sequence's tiles into the batch arrays.

    Args:
        block_idx: [HQ, NQB, NB_max] int32, pre-filled with -1; block_cnt: [HQ, NQB] int32.
        first_tile, first_row, num_rows: where the sequence's tiles sit (host integers).
        keep_v, keep_s: [HQ, NB] bool chosen verticals / slash offsets; None for a dense sequence.
        pooled: [HQ, R * NB] float32 pooled block map (rows of NB), threshold: [HQ] float32,
            query_aware: [HQ] bool; None when no head may be query-aware.
        dense_from: block row from which tiles keep every causal block (None: none).
    """
    hq = block_idx.shape[0]
    dense = keep_v is None
    has_pooled = pooled is not None
    dummy = block_cnt
    launcher(block_lists_kernel)[(num_rows, hq)](
        keep_v if not dense else dummy, keep_s if not dense else dummy,
        pooled if has_pooled else dummy, threshold if has_pooled else dummy,
        query_aware if has_pooled else dummy,
        block_idx, block_cnt, first_row, first_tile, nb, nb if dense_from is None else dense_from,
        keep_v.stride(0) if not dense else 0,
        pooled.stride(0) if has_pooled else 0, nb,
        block_idx.stride(0), block_idx.stride(1), block_cnt.stride(0),
        DENSE=dense, HAS_POOLED=has_pooled, BC=128, num_warps=4,
    )


@triton.jit(do_not_specialize=["first_row", "nb", "stride_ph"])
def pooled_map_kernel(
    q_bar, k_bar, query_aware, pooled, first_row, nb, scale, stride_ph,
    GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
):
    i_r = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    hq = tl.num_programs(1)
    if tl.load(query_aware + i_h) == 0:
        return
    row = first_row + i_r
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_q = tl.load(q_bar + (i_r * hq + i_h) * D + o_d, mask=m_d, other=0.0)
    p_k = k_bar + (i_h // GROUP) * D + o_d[None, :]
    # pass 1: the row's maximum and sum of exponentials over its causal blocks
    run_m = float("-inf")
    run_s = 0.0
    for c0 in range(0, nb, BC):
        o_c = c0 + tl.arange(0, BC)
        m_c = o_c <= row
        b_k = tl.load(p_k + o_c[:, None] * ((hq // GROUP) * D), mask=m_c[:, None] & m_d[None, :], other=0.0)
        x = tl.where(m_c, scale * tl.sum(b_k * b_q[None, :], axis=1), float("-inf"))
        new_m = tl.maximum(run_m, tl.max(x, axis=0))
        run_s = run_s * tl.exp(run_m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
        run_m = new_m
    # pass 2: the probabilities, 0 above the diagonal
    for c0 in range(0, nb, BC):
        o_c = c0 + tl.arange(0, BC)
        m_c = o_c <= row
        b_k = tl.load(p_k + o_c[:, None] * ((hq // GROUP) * D), mask=m_c[:, None] & m_d[None, :], other=0.0)
        x = scale * tl.sum(b_k * b_q[None, :], axis=1)
        p = tl.where(m_c, tl.exp(x - run_m) / run_s, 0.0)
        tl.store(pooled + i_h * stride_ph + i_r * nb + o_c, p, mask=o_c < nb)


def pooled_map(q_bar: torch.Tensor, k_bar: torch.Tensor, query_aware: torch.Tensor, first_row: int,
               scale: float) -> torch.Tensor:
    """Triton twin of ``kernels.naive.naive_pooled_map`` (rows of heads that are not
    query-aware are left unwritten).

    Args:
        q_bar: [R, HQ, D] float32 mean query per query tile; k_bar: [NB, H, D] float32;
        query_aware: [HQ] bool.
    Returns:
        [HQ, R * NB] float32.
    """
    r, hq, d = q_bar.shape
    nb, h_kv = k_bar.shape[0], k_bar.shape[1]
    out = torch.empty(hq, r * nb, dtype=torch.float32, device=q_bar.device)
    launcher(pooled_map_kernel)[(r, hq)](q_bar, k_bar, query_aware, out, first_row, nb, scale, out.stride(0),
                               GROUP=hq // h_kv, D=d, BD=triton.next_power_of_2(d), BC=64, num_warps=4)
    return out


@triton.jit(do_not_specialize=["n", "stride_ph"])
def coverage_threshold_kernel(
    pooled, query_aware, threshold, goal, n, stride_ph,
    ITERS: tl.constexpr, BLOCK: tl.constexpr,
):
    i_h = tl.program_id(0).to(tl.int64)
    if tl.load(query_aware + i_h) == 0:
        tl.store(threshold + i_h, 2.0)
        return
    # bisection in log2 space between 2^-126 (keep all) and 1 (keep the largest)
    lo = -126.0
    hi = 0.0
    for _ in range(ITERS):
        mid = 0.5 * (lo + hi)
        t = tl.exp2(mid)
        mass = 0.0
        for i0 in range(0, n, BLOCK):
            o = i0 + tl.arange(0, BLOCK)
            b_p = tl.load(pooled + i_h * stride_ph + o, mask=o < n, other=0.0)
            mass += tl.sum(tl.where(b_p >= t, b_p, 0.0), axis=0)
        if mass >= goal:
            lo = mid
        else:
            hi = mid
    tl.store(threshold + i_h, tl.exp2(lo))


def coverage_threshold(pooled: torch.Tensor, query_aware: torch.Tensor, target: float,
                       iters: int = 24) -> torch.Tensor:
    """Per head, a threshold t whose blocks ``P >= t`` carry at least ``target`` mass.

    ``t`` is within a factor 2^(126 / 2^iters) of the largest such threshold. Heads that
    are not query-aware get t = 2 (keep nothing).

    Args:
        pooled: [HQ, R * NB] float32 contiguous rows, non-negative.
        query_aware: [HQ] bool. target: the mass to reach.
    """
    hq, n = pooled.shape
    out = torch.empty(hq, dtype=torch.float32, device=pooled.device)
    launcher(coverage_threshold_kernel)[(hq,)](pooled, query_aware, out, target, n, pooled.stride(0),
                                     ITERS=iters, BLOCK=1024 if not interpreted(pooled) else 256, num_warps=8)
    return out
