"""Block-sparse attention through vLLM's own FlashAttention-4 (``vllm.vllm_flash_attn.cute``).

vLLM's wheel ships FlashAttention-4, written in the CuTe DSL, with a block-sparse forward
for Hopper: per (query head, 128-query block) it walks a list of 128-key blocks computed
without a mask ("full") and a list computed with the causal mask ("mask"). FlexPrefill's
lists are that input as they stand (``layout/lists.py``, ``layout.plans.QueryBlocks``):
each tile's blocks before its diagonal are full blocks, the diagonal the one mask block.
On Hopper it runs at FlashAttention's own rate, against about 0.7x for the Triton kernel
(docs/benchmarks.md).

It serves: compute capability 9.x, bf16 / fp16, head_dim 64 or 128, blocks of 128, contiguous
keys and values (no page table: FA4 cannot combine one with block sparsity), and the
CuTe DSL that vLLM declares as a dependency. ``unavailable`` says why not where it cannot;
``attention.py`` then runs the Triton kernel. The first call of a variant compiles it
(seconds); ``attention.compile_kernels`` makes that call at start-up. FA4 is imported on
first use only, and only here, in the kernels.

Twin: ``kernels/naive.py: naive_flash_attn_block_sparse`` (same arguments).
"""

from __future__ import annotations

import functools

import torch

BLOCK = 128
HEAD_DIMS = (64, 128)


@functools.cache
def _interface() -> tuple | None:
    """(FA4's forward, its block-sparse tensors tuple), or the ImportError's text."""
    try:
        from vllm.vllm_flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
        from vllm.vllm_flash_attn.cute.interface import _flash_attn_fwd
    except Exception as e:  # ImportError, or the CuTe DSL failing to load
        return (None, None), f"vllm.vllm_flash_attn.cute does not import ({type(e).__name__}: {e})"
    return (_flash_attn_fwd, BlockSparseTensorsTorch), None


@functools.cache
def _device_reason(index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    if major != 9:
        # Blackwell's FA4 forward takes 256-query blocks in varlen block sparsity
        return f"compute capability {major}.{minor} (FA4's block-sparse path here serves Hopper, 9.x)"
    return None


def unavailable(device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int) -> str | None:
    """Why FA4 cannot serve this device, dtype, head_dim and block size (None: it can)."""
    if device.type != "cuda":
        return f"a {device.type} device"
    if block_size != BLOCK:
        return f"sparse_block_size {block_size} (FA4 takes blocks of {BLOCK})"
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} (FA4's block sparsity takes {HEAD_DIMS} here)"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {dtype}"
    reason = _device_reason(device.index if device.index is not None else torch.cuda.current_device())
    if reason is not None:
        return reason
    return _interface()[1]


def flash_attn_block_sparse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, mask_cnt: torch.Tensor, mask_idx: torch.Tensor, full_cnt: torch.Tensor,
    full_idx: torch.Tensor, cu_tiles: torch.Tensor, cu_lists: torch.Tensor, block_size: int, scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """FA4's varlen block-sparse causal forward (twin: ``naive_flash_attn_block_sparse``).

    Args:
        q: [Tq, HQ, D]; k, v: [Tk, H, D] (last dim contiguous), bf16 or fp16.
        cu_seqlens_q, cu_seqlens_k: [N + 1] int32; causal is bottom-right per sequence.
        max_seqlen_q, max_seqlen_k: the longest query and key ranges.
        mask_cnt, full_cnt: [HQ, NQB] int32; mask_idx, full_idx: [HQ, L] int32 (broadcast
            views over the heads work): per tile, the blocks with and without the causal mask.
        cu_tiles: [N + 1] int32 first tile of each sequence; cu_lists: [N + 1] int32 where each
            sequence's [R, NB] lists start.
        out: optional [Tq, HQ, D] written in place.
    Returns:
        out.
    """
    (forward, tensors), reason = _interface()
    if forward is None:
        raise RuntimeError(reason)
    sparse = tensors(mask_block_cnt=mask_cnt, mask_block_idx=mask_idx, full_block_cnt=full_cnt,
                     full_block_idx=full_idx, cu_total_m_blocks=cu_tiles, cu_block_idx_offsets=cu_lists,
                     block_size=(block_size, block_size))
    # per-query-head lists: GQA's packed query heads would share one list
    out, *_ = forward(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                      max_seqlen_k=max_seqlen_k, softmax_scale=scale, causal=True, pack_gqa=False,
                      block_sparse_tensors=sparse, out=out)
    return out
