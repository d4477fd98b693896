"""Probe statistics and block means of every sparse sequence of a batch, in one launch.

One program per (query head, run of key blocks, sparse sequence). It scores the probe (the
chunk's last ``NP = min(BS, q_len)`` queries) against each of its key blocks and writes, per
probe row and block, the row maximum and the sum of exponentials, from which
``patterns/masses.py`` recovers the exact vertical and slash masses without materialising
the probe's attention matrix ([HQ, BS, N] float32 would be 2 GiB at 128k). The same programs
write the means the pattern test and the query-aware map need, from the tiles they load
anyway: the key blocks' means (first head of each group) and the probe's mean query (first
run). The mean query of each query tile, which only query-aware heads need, is the pooled
map's to compute (``kernels/block_lists.py``): here it would take a pass over every query
of the chunk for every head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_flexprefill.kernels.configs import cdiv, interpreted, next_pow2, probe_config, row_alignment
from vllm_flexprefill.kernels.launch import launcher
from vllm_flexprefill.layout.batch import BatchLayout
from vllm_flexprefill.layout.readers import sparse_seq
from vllm_flexprefill.layout.workspace import buffers


@triton.jit
def _rows_of(k_rows, k_start, o_j, k_len, ROW_ALIGN: tl.constexpr):
    """The paged-cache rows of key positions o_j ([BS] int64; 0 from k_len on)."""
    return tl.multiple_of(tl.load(k_rows + k_start + o_j, mask=o_j < k_len, other=0), ROW_ALIGN)


# the sequence table and the strides carry every length: one compilation serves every batch
@triton.jit(do_not_specialize=["stride_mh"])
def probe_kernel(
    q, k, k_rows, table, m_out, l_out, k_bar, q_probe_bar, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_mh, stride_mc,
    GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, BLOCKS: tl.constexpr,
    UPCAST: tl.constexpr, PAGED: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """Program (head, j, sequence): key blocks j * BLOCKS .. j * BLOCKS + BLOCKS - 1 of the
    sequence, in a loop that keeps the probe's queries (one program per key block was a
    short program each: 32 x 1024 of them for 32 heads at 128k keys)."""
    # heads vary fastest: the query heads of a KV head run side by side and read its key
    # blocks from L2 once (at 128k keys the K of 8 KV heads is 268 MB, beyond L2)
    i_h = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1).to(tl.int64) * BLOCKS
    i_j = tl.program_id(2)
    hq = tl.num_programs(0)
    _, q_start, q_len, k_start, k_len, kb, _ = sparse_seq(table, i_j)
    if c0 * BS >= k_len:  # the grid covers the longest sequence's blocks
        return
    c1 = tl.minimum(c0 + BLOCKS, tl.cdiv(k_len, BS))
    n_probe = tl.minimum(q_len, BS)
    o_i = tl.arange(0, BS)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_i = o_i < n_probe
    # probe row i is query q_len - n_probe + i, at position k_len - n_probe + i
    p_q = q + i_h * stride_qh + (q_start + q_len - n_probe + o_i)[:, None] * stride_qt + o_d[None, :]
    # [BS, BD]
    b_q = tl.load(p_q, mask=m_i[:, None] & m_d[None, :], other=0.0)
    if c0 == 0:
        tl.store(q_probe_bar + (i_j * hq + i_h) * D + o_d, tl.sum(b_q.to(tl.float32), axis=0) / n_probe, mask=m_d)
    if UPCAST:
        b_q = b_q.to(tl.float32)
    # on a paged cache each key's row is read one block ahead: K addresses that wait on a
    # load of the same iteration stall the loads' pipeline (as in kernels/block_sparse_attn.py)
    row_next = o_i.to(tl.int64)  # unused without a paged cache
    if PAGED:
        row_next = _rows_of(k_rows, k_start, c0 * BS + tl.arange(0, BS), k_len, ROW_ALIGN)
    for i_c in range(c0, c1):
        o_j = i_c * BS + tl.arange(0, BS)
        m_j = o_j < k_len
        if PAGED:  # each key's row in the paged cache
            row = row_next
            row_next = _rows_of(k_rows, k_start, o_j + BS, tl.where(i_c + 1 < c1, k_len, 0), ROW_ALIGN)
        else:
            row = (k_start + o_j) * stride_kt
        b_k = tl.load(k + (i_h // GROUP) * stride_kh + row[:, None] + o_d[None, :], mask=m_j[:, None] & m_d[None, :],
                      other=0.0)
        i_b = kb + i_c  # this key block among all sparse sequences' blocks
        if i_h % GROUP == 0:
            n_keys = tl.minimum(k_len - i_c * BS, BS)
            tl.store(k_bar + (i_b * (hq // GROUP) + i_h // GROUP) * D + o_d,
                     tl.sum(b_k.to(tl.float32), axis=0) / n_keys, mask=m_d)
        if UPCAST:
            b_k = b_k.to(tl.float32)
        # [BS(rows), BS(keys)] scores in log2 units
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2
        visible = (o_j[None, :] <= (k_len - n_probe + o_i)[:, None]) & m_i[:, None]
        b_s = tl.where(visible, b_s, float("-inf"))
        b_m = tl.max(b_s, axis=1)
        b_m_safe = tl.where(b_m == float("-inf"), 0.0, b_m)
        b_l = tl.sum(tl.exp2(b_s - b_m_safe[:, None]), axis=1)
        # natural-log maximum, so the statistics match the PyTorch twin
        tl.store(m_out + i_h * stride_mh + i_b * stride_mc + o_i, b_m * 0.6931471805599453)
        tl.store(l_out + i_h * stride_mh + i_b * stride_mc + o_i, b_l)


def probe_stats(
    q: torch.Tensor, k: torch.Tensor, layout: BatchLayout, scale: float,
    k_rows: torch.Tensor | None = None, config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``kernels.naive.naive_probe_stats`` (same arguments and results): the
    probe statistics and means of every sparse sequence of the batch, in one launch.

    Args:
        q: [Tq, HQ, D] packed as ``layout`` says; k: [Tk, H, D] likewise, or with ``k_rows``
            a view of a paged cache [..., H, D]; last dims contiguous.
        k_rows: optional [Tk] int64: where each key's row starts in k, in elements
            (``layout.paged.paged_rows``: sums of multiples of k's strides).
        config: launch settings (BLOCKS, num_warps, num_stages); default from kernels/configs.py.
    Returns (sparse sequence j's part at its offsets in ``layout.sparse_seqs()``):
        m, l: [HQ, NBt, BS] float32 per (key block, probe row) maximum score (natural log
            units) and sum of exponentials; rows past the sequence's NP = min(BS, q_len)
            are padding (m = -inf, l = 0).
        k_bar: [NBt, H, D] float32 key block means.
        q_probe_bar: [S, HQ, D] float32 mean of each sequence's probe queries.
    """
    hq, d = q.shape[1], q.shape[2]
    h_kv, bs = k.shape[-2], layout.block_size
    if k.stride(-1) != 1:
        raise ValueError(f"k's head_dim must be contiguous, got strides {k.stride()}")
    seqs = layout.sparse_seqs()
    ws, f32, dev = buffers(layout), torch.float32, q.device
    m = ws.empty("probe.m", (hq, seqs.num_blocks, bs), f32, dev)
    l = ws.empty("probe.l", (hq, seqs.num_blocks, bs), f32, dev)
    k_bar = ws.empty("probe.k_bar", (seqs.num_blocks, h_kv, d), f32, dev)
    q_probe_bar = ws.empty("probe.q_bar", (len(seqs.seqs), hq, d), f32, dev)
    if not seqs.seqs:
        return m, l, k_bar, q_probe_bar
    cfg = config or probe_config()
    launcher(probe_kernel)[(hq, cdiv(seqs.max_blocks, cfg["BLOCKS"]), len(seqs.seqs))](
        q, k, k_rows if k_rows is not None else m, seqs.table, m, l, k_bar, q_probe_bar, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k.stride(0), k.stride(-2), m.stride(0), m.stride(1),
        GROUP=hq // h_kv, D=d, BD=next_pow2(d), BS=bs, UPCAST=interpreted(k),
        PAGED=k_rows is not None,
        ROW_ALIGN=row_alignment(k, k_rows), **cfg,
    )
    return m, l, k_bar, q_probe_bar
