"""FlexPrefill's sparse attention through vLLM's FlashAttention-4 (Hopper): against the
naive specification on the same lists, on a shuffled paged cache with NaN in its unused
slots, odd lengths, several requests, GQA, head_dim 64 and 128, chunks with a cached prefix
that start inside a block and on a boundary; start-up compiles every variant it launches.
Skipped (with the reason) where FA4 does not run."""

import pytest
import torch
from reference import ATOL, dense_reference
from synthetic import paged_cache, random_block_lists

from vllm_flexprefill.attention import choose_kernel, compile_kernels, plan_cuda, select_blocks, sparse_attention
from vllm_flexprefill.config import FlexPrefillConfig
from vllm_flexprefill.kernels.naive import naive_block_sparse_attention
from vllm_flexprefill.layout.batch import BatchLayout
from vllm_flexprefill.layout.lists import BlockSelection

DEV = "cuda"


@pytest.fixture(autouse=True)
def fa4_runs():
    kernel, why = choose_kernel(DEV, torch.bfloat16, 128, 128)
    if kernel != "fa4":
        pytest.skip(f"FlashAttention-4 does not run here: {why}")


def lists(layout, hq, density, seed=1):
    idx, cnt = random_block_lists(layout, hq, density, torch.Generator().manual_seed(seed))
    return BlockSelection(idx, cnt, cnt - 1, torch.zeros(layout.num_seqs, hq, dtype=torch.bool, device=DEV))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d,hq,h,density", [(128, 8, 2, 0.3), (64, 9, 3, 0.5), (128, 4, 4, 1.0), (64, 8, 1, 0.1)])
def test_fa4_on_a_paged_cache_matches_the_spec(d, hq, h, density, dtype):
    torch.manual_seed(d + hq)
    # a fresh prompt, a chunk starting inside a block (context 1700 - 333), one on a boundary
    # (context 1024), a one-token chunk, odd lengths throughout
    q_lens, k_lens = [1000, 333, 1000, 1], [1000, 1700, 2024, 300]
    layout = BatchLayout.build(q_lens, k_lens, 128, DEV)
    plan_cuda(layout, "fa4")
    q = torch.randn(sum(q_lens), hq, d, dtype=dtype, device=DEV)
    k, v = torch.randn(2, sum(k_lens), h, d, dtype=dtype, device=DEV)
    key_cache, value_cache, rows = paged_cache(k, v, k_lens)  # unused slots NaN
    sel = lists(layout, hq, density)
    out = torch.full_like(q, float("nan"))
    sparse_attention(q, key_cache, value_cache, layout, sel, d ** -0.5, out=out, k_rows=rows, kernel="fa4")
    ref = naive_block_sparse_attention(q, k, v, *layout.grid(), sel.block_idx, sel.block_cnt, 128, d ** -0.5)
    assert not out.isnan().any(), "every output row must be written"
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[dtype], rtol=0)
    if density == 1.0:
        torch.testing.assert_close(out.float(), dense_reference(q, k, v, q_lens, k_lens, d ** -0.5),
                                   atol=ATOL[dtype], rtol=0)


def test_fa4_reads_a_prompts_own_keys():
    torch.manual_seed(3)
    q_lens = [1500, 700]
    layout = BatchLayout.build(q_lens, q_lens, 128, DEV)
    q = torch.randn(2200, 8, 128, dtype=torch.bfloat16, device=DEV)
    k, v = torch.randn(2, 2200, 2, 128, dtype=torch.bfloat16, device=DEV)
    key_cache, value_cache, rows = paged_cache(k, v, q_lens)
    sel = lists(layout, 8, 0.4)
    want = sparse_attention(q, key_cache, value_cache, layout, sel, 0.1, k_rows=rows, kernel="fa4")
    # the cache poisoned: with the step's own keys it is not read
    key_cache.fill_(float("nan"))
    got = sparse_attention(q, key_cache, value_cache, layout, sel, 0.1, k_rows=rows, k_new=k, v_new=v, kernel="fa4")
    assert torch.equal(got, want)


def test_the_same_chosen_blocks_give_the_same_output_on_either_kernel():
    # accuracy does not move with the kernel: the estimation's lists through FA4 and Triton
    from synthetic import planted_inputs

    q_lens, k_lens = [4000, 3000], [4000, 9100]
    q, k, v = planted_inputs(q_lens, k_lens, 8, 2, 128, device=DEV, seed=4)
    layout = BatchLayout.build(q_lens, k_lens, 128, DEV)
    cfg = FlexPrefillConfig(min_sparse_tokens=0)
    sel = select_blocks(q, k, layout, cfg, 128 ** -0.5)
    fa4 = sparse_attention(q, k, v, layout, sel, 128 ** -0.5, kernel="fa4")
    triton = sparse_attention(q, k, v, layout, sel, 128 ** -0.5, kernel="triton")
    torch.testing.assert_close(fa4.float(), triton.float(), atol=ATOL[torch.bfloat16], rtol=0)


def test_fa4_variants_compile_at_start_up():
    from vllm.vllm_flash_attn.cute.interface import _flash_attn_fwd

    from vllm_flexprefill.layout.paged import paged_rows

    cfg = FlexPrefillConfig(min_sparse_tokens=0)
    compile_kernels(12, 2, 128, cfg, torch.bfloat16, DEV)
    before = len(_flash_attn_fwd.compile_cache.cache)
    # a chunk of other lengths, inside a block, on a paged cache; and a fresh prompt
    for q_len, k_len in ((3001, 20011), (5000, 5000)):
        q = torch.randn(q_len, 12, 128, dtype=torch.bfloat16, device=DEV)
        cache = torch.randn(2, -(-k_len // 16) + 3, 16, 2, 128, dtype=torch.bfloat16, device=DEV)
        positions = torch.arange(k_len, device=DEV)
        rows = paged_rows(cache[0], positions // 16 + 3, positions % 16)
        layout = BatchLayout.build([q_len], [k_len], 128, DEV)
        plan_cuda(layout, "fa4")
        sel = select_blocks(q, cache[0], layout, cfg, 128 ** -0.5, rows)
        sparse_attention(q, cache[0], cache[1], layout, sel, 128 ** -0.5, k_rows=rows, kernel="fa4")
    torch.cuda.synchronize()
    assert len(_flash_attn_fwd.compile_cache.cache) == before, "a variant compiled after start-up"
