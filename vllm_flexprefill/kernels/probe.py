"""Probe statistics and block means of one sequence, in one launch.

One program per (query head, key block). It scores the probe (the chunk's last
``NP = min(BS, q_len)`` queries) against its key block and writes, per probe row, the row
maximum and the sum of exponentials, from which ``patterns/estimate.py`` recovers the
exact vertical and slash masses without materialising the probe's attention matrix
([HQ, BS, N] float32 would be 2 GiB at 128k). The same programs write the means the
pattern test and the query-aware map need, from the tiles they load anyway: the key
block's mean (first head of each group), the probe's mean query (key block 0), and the
mean query of each query tile of the chunk (when asked).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_flexprefill.kernels.configs import interpreted, probe_config, row_alignment
from vllm_flexprefill.kernels.launch import launcher


# lengths, and the strides that follow them, vary per call: not specialised on, so one compilation
# serves every prompt (a new variant would compile in the middle of serving)
# (k_rows too: a later sequence's rows start anywhere in the step's array, 8-byte aligned)
@triton.jit(do_not_specialize=["k_rows", "q_len", "k_len", "n_probe", "first_row", "stride_mh"])
def probe_kernel(
    q, k, k_rows, m_out, l_out, k_bar, q_probe_bar, q_bar,
    q_len, k_len, n_probe, first_row, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_mh, stride_mc,
    GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, UPCAST: tl.constexpr,
    QUERY_MEANS: tl.constexpr, PAGED: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    # heads vary fastest: the query heads of a KV head run side by side and read its key
    # block from L2 once (at 128k keys the K of 8 KV heads is 268 MB, beyond L2)
    i_h = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    hq = tl.num_programs(0)
    o_i = tl.arange(0, BS)
    o_j = i_c * BS + tl.arange(0, BS)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_i = o_i < n_probe
    m_j = o_j < k_len
    # probe row i is query q_len - n_probe + i, at position k_len - n_probe + i
    p_q = q + i_h * stride_qh + (q_len - n_probe + o_i)[:, None] * stride_qt + o_d[None, :]
    if PAGED:  # each key's row in the paged cache
        row = tl.multiple_of(tl.load(k_rows + o_j, mask=m_j, other=0), ROW_ALIGN)
    else:
        row = o_j * stride_kt
    p_k = k + (i_h // GROUP) * stride_kh + row[:, None] + o_d[None, :]
    # [BS, BD]
    b_q = tl.load(p_q, mask=m_i[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    b_k = tl.load(p_k, mask=m_j[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    if i_h % GROUP == 0:
        n_keys = tl.minimum(k_len - i_c * BS, BS)
        tl.store(k_bar + (i_c * (hq // GROUP) + i_h // GROUP) * D + o_d, tl.sum(b_k, axis=0) / n_keys, mask=m_d)
    if i_c == 0:
        tl.store(q_probe_bar + i_h * D + o_d, tl.sum(b_q, axis=0) / n_probe, mask=m_d)
    if QUERY_MEANS:
        if i_c >= first_row:
            # the chunk's queries in this tile: positions max(c * BS, k_len - q_len) .. min((c + 1) * BS, k_len)
            pos = i_c * BS + o_i
            m_t = (pos >= k_len - q_len) & (pos < k_len)
            b_t = tl.load(q + i_h * stride_qh + (pos - (k_len - q_len))[:, None] * stride_qt + o_d[None, :],
                          mask=m_t[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            n_t = tl.sum(m_t.to(tl.float32), axis=0)
            tl.store(q_bar + ((i_c - first_row) * hq + i_h) * D + o_d, tl.sum(b_t, axis=0) / n_t, mask=m_d)
    if not UPCAST:
        b_q = b_q.to(q.dtype.element_ty)
        b_k = b_k.to(k.dtype.element_ty)
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
    q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float, query_means: bool = False,
    k_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Triton twin of ``kernels.naive.naive_probe_stats`` (same arguments and results).

    Args:
        q: [q_len, HQ, D] one sequence's queries (the last q_len of the k_len positions);
            k: [k_len, H, D] its keys; last dims contiguous. With ``k_rows``, k is a view
            of a paged cache [..., H, D].
        query_means: also return the mean query of each of the chunk's query tiles.
        k_rows: optional [k_len] int64: where each key's row starts in k, in elements
            (``patterns.layout.paged_rows``: sums of multiples of k's strides).
    Returns:
        m, l: [HQ, NB, BS] float32 per (key block, probe row) maximum score (natural log
            units) and sum of exponentials; rows past NP are padding (m = -inf, l = 0).
        k_bar: [NB, H, D] float32 key block means.
        q_probe_bar: [HQ, D] float32 mean of the probe queries.
        q_bar: [R, HQ, D] float32 mean query of each query tile (R tiles from block row
            ``(k_len - q_len) // BS``), or None.
    """
    q_len, hq, d = q.shape
    k_len, h_kv = (k.shape[0] if k_rows is None else k_rows.shape[0]), k.shape[-2]
    if k.stride(-1) != 1:
        raise ValueError(f"k's head_dim must be contiguous, got strides {k.stride()}")
    nb = triton.cdiv(k_len, block_size)
    n_probe = min(block_size, q_len)
    first_row = (k_len - q_len) // block_size
    f32 = dict(dtype=torch.float32, device=q.device)
    m = torch.empty(hq, nb, block_size, **f32)
    l = torch.empty_like(m)
    k_bar = torch.empty(nb, h_kv, d, **f32)
    q_probe_bar = torch.empty(hq, d, **f32)
    q_bar = torch.empty(nb - first_row, hq, d, **f32) if query_means else None
    launcher(probe_kernel)[(hq, nb)](
        q, k, k_rows if k_rows is not None else m, m, l, k_bar, q_probe_bar, q_bar if query_means else m,
        q_len, k_len, n_probe, first_row, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k.stride(0), k.stride(-2), m.stride(0), m.stride(1),
        GROUP=hq // h_kv, D=d, BD=triton.next_power_of_2(d), BS=block_size, UPCAST=interpreted(k),
        QUERY_MEANS=query_means, PAGED=k_rows is not None,
        ROW_ALIGN=row_alignment(k, k_rows), **probe_config(d, block_size),
    )
    return m, l, k_bar, q_probe_bar, q_bar
