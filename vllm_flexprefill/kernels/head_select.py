"""Per-head block selection after the probe, fused into one program per query head.

From the probe statistics (``kernels/probe.py``) one program recovers the head's vertical
and slash masses, runs the Jensen-Shannon pattern test against the pooled estimate, and
chooses the vertical blocks and slash offsets that cover ``gamma`` of their masses within
the budget. It replaces about a hundred small PyTorch launches, whose host cost (about
2 ms per sequence and layer) dominated the estimation below 64k tokens.

Twins: ``patterns/estimate.py: probe_masses`` and ``patterns/coverage.py`` (PyTorch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# in-register sort of the block masses; longer sequences use the PyTorch path
MAX_BLOCKS = 4096


@triton.jit
def _cover(mass_ptr, keep_ptr, nb, forced_idx, gamma, min_count, max_count, NBP: tl.constexpr):
    """Marks the fewest entries (forced one first, then by descending mass) reaching gamma."""
    o_c = tl.arange(0, NBP)
    m_c = o_c < nb
    mass = tl.load(mass_ptr + o_c, mask=m_c, other=0.0)
    total = tl.sum(mass, axis=0)
    bits = tl.where(o_c == forced_idx, float("inf"), mass).to(tl.int32, bitcast=True).to(tl.int64)
    # descending order, lower index first on ties (as a stable descending sort)
    key = tl.where(m_c, (bits << 32) | (NBP - 1 - o_c).to(tl.int64), -1)
    key = tl.sort(key, descending=True)
    idx = (NBP - 1 - (key & 0xFFFFFFFF)).to(tl.int32)
    m_s = key >= 0
    sorted_mass = tl.load(mass_ptr + idx, mask=m_s, other=0.0)
    before = tl.cumsum(sorted_mass, axis=0) - sorted_mass
    count = tl.sum(((before < gamma * total) & m_s).to(tl.int32), axis=0)
    count = tl.minimum(tl.maximum(count, min_count), tl.minimum(max_count, nb))
    tl.store(keep_ptr + idx, (o_c < count).to(tl.int8), mask=m_s)


@triton.jit
def head_select_kernel(
    m, l, k_bar, q_bar, scratch, keep_v, keep_s, query_aware,
    nb, n_probe, k_len, scale, gamma, tau, min_blocks, max_blocks, qa_blocks,
    stride_mh, stride_mc, stride_kc, stride_kh, stride_qh, stride_sh, stride_vh,
    GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, NBP: tl.constexpr,
    BC: tl.constexpr,
):
    i_h = tl.program_id(0).to(tl.int64)
    o_i = tl.arange(0, BS)
    m_i = o_i < n_probe
    p_m = m + i_h * stride_mh
    p_l = l + i_h * stride_mh
    # scratch rows: vertical, slash part of the last probe block row, part of the row before, estimate
    p_v = scratch + i_h * stride_sh
    p_p0 = p_v + NBP
    p_p1 = p_v + 2 * NBP
    p_e = p_v + 3 * NBP

    # each probe row's log-sum-exp over all key blocks
    b_run = tl.full([BS], float("-inf"), dtype=tl.float32)
    b_sum = tl.zeros([BS], dtype=tl.float32)
    for c0 in range(0, nb, BC):
        o_c = c0 + tl.arange(0, BC)
        m_blk = (o_c < nb)[:, None] & m_i[None, :]
        b_mm = tl.load(p_m + o_c[:, None] * stride_mc + o_i[None, :], mask=m_blk, other=float("-inf"))
        b_ll = tl.load(p_l + o_c[:, None] * stride_mc + o_i[None, :], mask=m_blk, other=0.0)
        b_x = tl.where(b_ll > 0, b_mm + tl.log(tl.maximum(b_ll, 1e-30)), float("-inf"))
        b_new = tl.maximum(b_run, tl.max(b_x, axis=0))
        b_safe = tl.where(b_new == float("-inf"), 0.0, b_new)
        b_sum = b_sum * tl.exp(b_run - b_safe) + tl.sum(tl.exp(b_x - b_safe[None, :]), axis=0)
        b_run = b_new
    b_lse = tl.where(b_sum > 0, b_run + tl.log(tl.maximum(b_sum, 1e-30)), 0.0)

    # per key block: vertical mass, and the slash mass split by the probe row's block row
    last_row = (k_len - 1) // BS
    in_last = ((k_len - n_probe + o_i) // BS) == last_row
    o_d = tl.arange(0, BD)
    b_q = tl.load(q_bar + i_h * stride_qh + o_d, mask=o_d < D, other=0.0)
    for c0 in range(0, nb, BC):
        o_c = c0 + tl.arange(0, BC)
        m_c = o_c < nb
        m_blk = m_c[:, None] & m_i[None, :]
        b_mm = tl.load(p_m + o_c[:, None] * stride_mc + o_i[None, :], mask=m_blk, other=0.0)
        b_ll = tl.load(p_l + o_c[:, None] * stride_mc + o_i[None, :], mask=m_blk, other=0.0)
        b_w = tl.where(b_ll > 0, b_ll * tl.exp(b_mm - b_lse[None, :]), 0.0) / n_probe
        tl.store(p_v + o_c, tl.sum(b_w, axis=1), mask=m_c)
        tl.store(p_p0 + o_c, tl.sum(tl.where(in_last[None, :], b_w, 0.0), axis=1), mask=m_c)
        tl.store(p_p1 + o_c, tl.sum(tl.where(in_last[None, :], 0.0, b_w), axis=1), mask=m_c)
        # pooled estimate logits: scale * mean(q_probe) . mean_block(k)
        b_k = tl.load(k_bar + o_c[:, None] * stride_kc + (i_h // GROUP) * stride_kh + o_d[None, :],
                      mask=m_c[:, None] & (o_d < D)[None, :], other=0.0)
        tl.store(p_e + o_c, scale * tl.sum(b_k * b_q[None, :], axis=1), mask=m_c)
    tl.debug_barrier()

    o_c = tl.arange(0, NBP)
    m_c = o_c < nb
    vertical = tl.load(p_v + o_c, mask=m_c, other=0.0)
    # slash offset s: the last row's blocks at column last_row - s, the previous row's at last_row - 1 - s
    slash = tl.load(p_p0 + last_row - o_c, mask=m_c & (o_c <= last_row), other=0.0) \
        + tl.load(p_p1 + last_row - 1 - o_c, mask=m_c & (o_c <= last_row - 1), other=0.0)
    logits = tl.load(p_e + o_c, mask=m_c, other=float("-inf"))
    est = tl.exp(logits - tl.max(logits, axis=0))
    est = est / tl.sum(est, axis=0)
    # Jensen-Shannon distance, 0 * log 0 = 0
    mid = 0.5 * (est + vertical)
    tiny = 1.1754943508222875e-38
    log_mid = tl.log(tl.maximum(mid, tiny))
    kl_e = tl.sum(tl.where(est > 0, est * (tl.log(tl.maximum(est, tiny)) - log_mid), 0.0), axis=0)
    kl_v = tl.sum(tl.where(vertical > 0, vertical * (tl.log(tl.maximum(vertical, tiny)) - log_mid), 0.0), axis=0)
    js = tl.sqrt(tl.maximum(0.5 * (kl_e + kl_v), 0.0))
    qa = js < tau
    tl.store(query_aware + i_h, qa.to(tl.int8))
    tl.debug_barrier()
    tl.store(p_e + o_c, slash, mask=m_c)
    tl.debug_barrier()

    lo = tl.where(qa, qa_blocks, min_blocks)
    hi = tl.where(qa, qa_blocks, max_blocks)
    _cover(p_v, keep_v + i_h * stride_vh, nb, 0, gamma, lo, hi, NBP)
    _cover(p_e, keep_s + i_h * stride_vh, nb, 0, gamma, lo, hi, NBP)


def select_heads(
    m: torch.Tensor, l: torch.Tensor, k_bar: torch.Tensor, q_probe_bar: torch.Tensor, n_probe: int, k_len: int,
    scale: float, gamma: float, tau: float, min_blocks: int, max_blocks: int, qa_blocks: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vertical/slash choice and pattern test of every head of one sequence.

    Args:
        m, l: [HQ, NB, BS] probe statistics; k_bar: [NB, H, D] float32 key block means;
        q_probe_bar: [HQ, D] float32 mean of the probe queries.
        min_blocks, max_blocks: budget of vertical-slash heads; qa_blocks: of query-aware heads.
    Returns:
        keep_v [HQ, NB] bool, keep_s [HQ, NB] bool (chosen block offsets), query_aware [HQ] bool.
    """
    hq, nb, bs = m.shape
    h_kv, d = k_bar.shape[1], k_bar.shape[2]
    nbp = triton.next_power_of_2(nb)
    scratch = torch.empty(hq, 4 * nbp, dtype=torch.float32, device=m.device)
    keep_v = torch.zeros(hq, nb, dtype=torch.int8, device=m.device)
    keep_s = torch.zeros(hq, nb, dtype=torch.int8, device=m.device)
    query_aware = torch.empty(hq, dtype=torch.int8, device=m.device)
    head_select_kernel[(hq,)](
        m, l, k_bar, q_probe_bar, scratch, keep_v, keep_s, query_aware,
        nb, n_probe, k_len, scale, gamma, tau, min_blocks, max_blocks, qa_blocks,
        m.stride(0), m.stride(1), k_bar.stride(0), k_bar.stride(1), q_probe_bar.stride(0), scratch.stride(0),
        keep_v.stride(0),
        GROUP=hq // h_kv, D=d, BD=triton.next_power_of_2(d), BS=bs, NBP=nbp, BC=max(1, min(64, 4096 // bs)),
        num_warps=8,
    )
    return keep_v.bool(), keep_s.bool(), query_aware.bool()
