"""The FlashAttention-4 path of the sparse attention, through its PyTorch twins: the lists as
FA4 reads them (query blocks, padding of chunks that start inside a block, the diagonal as
the one masked block), the keys copied out of a paged cache, and the choice of kernel
(with FA4 unimportable, the Triton kernel runs and says why)."""

import sys

import pytest
import torch
from reference import ATOL, dense_reference
from synthetic import paged_cache, random_block_lists

from vllm_flexprefill.attention import choose_kernel, sparse_attention
from vllm_flexprefill.kernels import fa4
from vllm_flexprefill.layout.batch import BatchLayout
from vllm_flexprefill.layout.lists import BlockSelection

CASES = [
    # q_lens, k_lens, block size, HQ, H, D, density
    pytest.param([37, 100, 64], [37, 181, 200], 32, 4, 2, 64, 0.4, id="chunks-inside-blocks-gqa2"),
    pytest.param([64, 96], [128, 160], 32, 2, 1, 64, 0.5, id="chunks-on-block-boundaries"),
    pytest.param([5, 90], [133, 90], 32, 4, 1, 128, 0.0, id="tiny-chunk-d128-diagonal-and-sink-only"),
    pytest.param([200, 130], [330, 130], 128, 2, 2, 64, 1.0, id="bs128-full"),
]


def selection(layout, hq, density, seed):
    idx, cnt = random_block_lists(layout, hq, density, torch.Generator().manual_seed(seed))
    return BlockSelection(idx, cnt, cnt - 1, torch.zeros(layout.num_seqs, hq, dtype=torch.bool))


@pytest.mark.parametrize("q_lens,k_lens,bs,hq,h,d,density", CASES)
def test_fa4_lists_give_the_same_output_as_the_block_sparse_kernel(q_lens, k_lens, bs, hq, h, d, density):
    torch.manual_seed(sum(k_lens))
    layout = BatchLayout.build(q_lens, k_lens, bs, "cpu")
    q = torch.randn(sum(q_lens), hq, d)
    k, v = torch.randn(2, sum(k_lens), h, d)
    sel = selection(layout, hq, density, seed=bs)
    want = sparse_attention(q, k, v, layout, sel, 0.11, kernel="triton")
    out = torch.full_like(q, float("nan"))
    got = sparse_attention(q, k, v, layout, sel, 0.11, out=out, kernel="fa4")
    assert got is out and not out.isnan().any(), "every output row must be written"
    torch.testing.assert_close(out, want, atol=ATOL[torch.float32], rtol=0)
    if density == 1.0:
        torch.testing.assert_close(out, dense_reference(q, k, v, q_lens, k_lens, 0.11), atol=ATOL[torch.float32],
                                   rtol=0)


def test_keys_copied_out_of_a_paged_cache_or_the_prompts_own():
    torch.manual_seed(5)
    q_lens, k_lens, bs, hq, h, d = [100, 70], [181, 70], 32, 4, 2, 64
    layout = BatchLayout.build(q_lens, k_lens, bs, "cpu")
    q = torch.randn(sum(q_lens), hq, d, dtype=torch.bfloat16)
    k, v = torch.randn(2, sum(k_lens), h, d, dtype=torch.bfloat16)
    key_cache, value_cache, rows = paged_cache(k, v, k_lens)  # unused slots are NaN
    sel = selection(layout, hq, 0.5, seed=1)
    want = sparse_attention(q, k, v, layout, sel, 0.125, kernel="triton")
    got = sparse_attention(q, key_cache, value_cache, layout, sel, 0.125, k_rows=rows, kernel="fa4")
    torch.testing.assert_close(got.float(), want.float(), atol=ATOL[torch.bfloat16], rtol=0)
    # whole prompts: the step's own keys stand in for the cache (poisoned: it must not be read)
    fresh = BatchLayout.build([70, 50], [70, 50], bs, "cpu")
    q2, k2, v2 = torch.randn(120, hq, d), torch.randn(120, h, d), torch.randn(120, h, d)
    sel2 = selection(fresh, hq, 0.5, seed=2)
    want = sparse_attention(q2, k2, v2, fresh, sel2, 0.125, kernel="triton")
    poison = torch.full((8, 16, h, d), float("nan"))
    got = sparse_attention(q2, poison, poison, fresh, sel2, 0.125, k_rows=torch.zeros(120, dtype=torch.long),
                           k_new=k2, v_new=v2, kernel="fa4")
    torch.testing.assert_close(got, want, atol=ATOL[torch.float32], rtol=0)


def test_query_blocks_pad_chunks_that_start_inside_a_block():
    layout = BatchLayout.build([37, 100, 64], [37, 181, 200], 32, "cpu")
    qb = layout.query_blocks()
    assert qb.padded and layout.query_blocks() is qb, "made once per layout"
    # contexts 0, 81, 136: padded by 0, 17, 8 rows in front
    assert qb.cu_seqlens_q.tolist() == [0, 37, 154, 226] and qb.num_rows == 226
    assert qb.q_rows.tolist() == list(range(37)) + list(range(54, 154)) + list(range(162, 226))
    assert (qb.max_seqlen_q, qb.max_seqlen_k) == (117, 200)
    # FA4's query block i of a sequence is its tile i; each tile's diagonal starts its list
    assert layout.cu_tiles.tolist() == list(layout.first_tile)
    starts = layout.tile_list[:-1].long()
    assert torch.equal(qb.diagonal[0, starts], layout.tile_row) and qb.ones.shape == (1, layout.num_tiles)
    assert not BatchLayout.build([64, 32], [128, 32], 32, "cpu").query_blocks().padded


def test_kernel_choice_on_the_cpu_runs_the_twins():
    assert choose_kernel("cpu", torch.float32, 64, 128, "auto") == ("triton", None)
    assert choose_kernel("cpu", torch.float32, 64, 128, "fa4") == ("fa4", None)
    assert choose_kernel("cpu", torch.float32, 64, 128, "triton") == ("triton", None)


def test_without_fa4_the_triton_kernel_runs_and_says_why(monkeypatch):
    # a Hopper GPU whose vLLM build lacks FA4 (or the CuTe DSL): stands in for both
    monkeypatch.setattr(fa4, "_device_reason", lambda index: None)
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn.cute.interface", None)
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn.cute.block_sparsity", None)
    fa4._interface.cache_clear()
    try:
        cuda = torch.device("cuda", 0)
        kernel, why = choose_kernel(cuda, torch.bfloat16, 128, 128, "auto")
        assert kernel == "triton" and "vllm.vllm_flash_attn.cute does not import" in why
        with pytest.raises(ValueError, match="kernel='fa4' was asked for.*does not import.*Set kernel to 'auto'"):
            choose_kernel(cuda, torch.bfloat16, 128, 128, "fa4")
        with pytest.raises(RuntimeError, match="does not import"):
            fa4.flash_attn_block_sparse(*[None] * 15)
    finally:
        fa4._interface.cache_clear()


@pytest.mark.parametrize("dtype,head_dim,block,why", [
    (torch.bfloat16, 256, 128, "head_dim 256"), (torch.bfloat16, 128, 64, "sparse_block_size 64"),
    (torch.float32, 128, 128, "dtype torch.float32")])
def test_shapes_fa4_cannot_serve_go_to_triton(monkeypatch, dtype, head_dim, block, why):
    monkeypatch.setattr(fa4, "_device_reason", lambda index: None)
    kernel, reason = choose_kernel(torch.device("cuda", 0), dtype, head_dim, block, "auto")
    assert kernel == "triton" and why in reason
