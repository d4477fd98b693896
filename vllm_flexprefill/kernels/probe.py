"""Probe statistics: softmax pieces of the last query block against every key block.

One program per (key block, query head). It never materialises the probe's attention
matrix ([HQ, BS, N] float32 would be 2 GiB at 128k): it writes, per key block and probe
row, the row maximum and the sum of exponentials, from which ``patterns/estimate.py``
recovers the exact vertical and slash masses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_flexprefill.kernels.configs import interpreted, probe_config


@triton.jit
def probe_stats_kernel(
    q, k, m_out, l_out,
    n_probe, k_len, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_mh, stride_mc,
    GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, UPCAST: tl.constexpr,
):
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    o_i = tl.arange(0, BS)
    o_j = i_c * BS + tl.arange(0, BS)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_i = o_i < n_probe
    # probe row i sits at position k_len - n_probe + i
    p_q = q + i_h * stride_qh + o_i[:, None] * stride_qt + o_d[None, :]
    p_k = k + (i_h // GROUP) * stride_kh + o_j[:, None] * stride_kt + o_d[None, :]
    # [BS, BD]
    b_q = tl.load(p_q, mask=m_i[:, None] & m_d[None, :], other=0.0)
    b_k = tl.load(p_k, mask=(o_j < k_len)[:, None] & m_d[None, :], other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)
        b_k = b_k.to(tl.float32)
    # [BS(rows), BS(keys)] scores in log2 units
    b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2
    visible = (o_j[None, :] <= (k_len - n_probe + o_i)[:, None]) & m_i[:, None]
    b_s = tl.where(visible, b_s, float("-inf"))
    b_m = tl.max(b_s, axis=1)
    b_m_safe = tl.where(b_m == float("-inf"), 0.0, b_m)
    b_l = tl.sum(tl.exp2(b_s - b_m_safe[:, None]), axis=1)
    # natural-log maximum, so the statistics match the PyTorch twin
    tl.store(m_out + i_h * stride_mh + i_c * stride_mc + o_i, b_m * 0.6931471805599453)
    tl.store(l_out + i_h * stride_mh + i_c * stride_mc + o_i, b_l)


def probe_stats(
    q_probe: torch.Tensor, k: torch.Tensor, block_size: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``kernels.naive.naive_probe_stats``.

    Args:
        q_probe: [NP, HQ, D] with NP <= block_size; k: [k_len, H, D]; last dims contiguous.
    Returns:
        m, l: [HQ, NB, BS] float32.
    """
    n_probe, hq, d = q_probe.shape
    k_len, h_kv = k.shape[0], k.shape[1]
    nb = triton.cdiv(k_len, block_size)
    m = torch.empty(hq, nb, block_size, dtype=torch.float32, device=q_probe.device)
    l = torch.empty_like(m)
    cfg = probe_config(d, block_size)
    probe_stats_kernel[(nb, hq)](
        q_probe, k, m, l,
        n_probe, k_len, scale * 1.4426950408889634,
        q_probe.stride(0), q_probe.stride(1), k.stride(0), k.stride(1),
        m.stride(0), m.stride(1),
        GROUP=hq // h_kv, D=d, BD=triton.next_power_of_2(d), BS=block_size, UPCAST=interpreted(k),
        **cfg,
    )
    return m, l
