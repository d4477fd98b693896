"""Copying key positions out of a paged KV cache into contiguous keys and values.

FlashAttention-4's block-sparse forward reads contiguous K/V; a chunk after the first has
its earlier keys in vLLM's paged cache. One program per (run of BT key positions, KV head)
reads their K and V rows at the rows ``layout.paged.paged_rows`` gives and writes them in
order: one pass over the group's keys, about 4 x H x D bytes per key position.

Twin: ``kernels/naive.py: naive_gather_rows`` (same arguments).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_flexprefill.kernels.configs import cdiv, next_pow2, row_alignment
from vllm_flexprefill.kernels.launch import launcher


@triton.jit(do_not_specialize=["n"])
def gather_rows_kernel(k, v, k_rows, k_out, v_out, n, stride_kh, stride_ot, stride_oh,
                       D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, ROW_ALIGN: tl.constexpr):
    o_t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    i_h = tl.program_id(1).to(tl.int64)
    m_t = o_t < n
    o_d = tl.arange(0, BD)
    m = m_t[:, None] & (o_d < D)[None, :]
    rows = tl.multiple_of(tl.load(k_rows + o_t, mask=m_t, other=0), ROW_ALIGN)
    src = rows[:, None] + i_h * stride_kh + o_d[None, :]
    dst = o_t[:, None] * stride_ot + i_h * stride_oh + o_d[None, :]
    tl.store(k_out + dst, tl.load(k + src, mask=m), mask=m)
    tl.store(v_out + dst, tl.load(v + src, mask=m), mask=m)


def gather_rows(k: torch.Tensor, v: torch.Tensor, k_rows: torch.Tensor, k_out: torch.Tensor,
                v_out: torch.Tensor) -> None:
    """Copies the key and value rows at ``k_rows`` into k_out, v_out.

    Args:
        k, v: views of a paged cache [..., H, D] with equal strides, head_dim contiguous.
        k_rows: [Tk] int64 element offsets of each key position's row (``paged_rows``).
        k_out, v_out: [Tk, H, D] with equal strides, head_dim contiguous.
    """
    n, h, d = k_out.shape
    if n == 0:
        return
    launcher(gather_rows_kernel)[(cdiv(n, 64), h)](
        k, v, k_rows, k_out, v_out, n, k.stride(-2), k_out.stride(0), k_out.stride(1),
        D=d, BD=next_pow2(d), BT=64, ROW_ALIGN=row_alignment(k, k_rows), num_warps=4)
