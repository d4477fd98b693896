"""Triton kernels against their PyTorch twins on identical inputs (Triton interpreter)."""

import pytest
import torch

from vllm_flexprefill.kernels.block_sparse_attn import block_sparse_attention
from vllm_flexprefill.kernels.naive import naive_block_sparse_attention, naive_probe_stats
from vllm_flexprefill.kernels.probe import probe_stats
from vllm_flexprefill.patterns.layout import BatchLayout
from vllm_flexprefill.testing import ATOL, dense_reference, random_block_lists

CASES = [
    # q_lens, k_lens, block_size, HQ, H, D, density
    pytest.param([37], [37], 16, 2, 2, 64, 0.5, id="one-seq-odd-len"),
    pytest.param([37, 100, 64], [37, 181, 200], 32, 4, 2, 64, 0.4, id="varlen-chunks-gqa2"),
    pytest.param([5, 90], [133, 90], 32, 4, 1, 64, 0.0, id="tiny-chunk-mqa-forced-only"),
    pytest.param([70, 33], [70, 97], 32, 2, 1, 128, 1.0, id="d128-full"),
    pytest.param([129], [129], 64, 2, 1, 64, 0.3, id="bs64-partial-last-block"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("q_lens,k_lens,bs,hq,h,d,density", CASES)
def test_block_sparse_attention_matches_naive(q_lens, k_lens, bs, hq, h, d, density, dtype):
    torch.manual_seed(sum(q_lens) + bs)
    layout = BatchLayout.build(q_lens, k_lens, bs, "cpu")
    q = torch.randn(sum(q_lens), hq, d, dtype=dtype)
    k = torch.randn(sum(k_lens), h, d, dtype=dtype)
    v = torch.randn(sum(k_lens), h, d, dtype=dtype)
    idx, cnt = random_block_lists(layout, hq, density)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((hq, q.shape[0]), float("nan"))
    block_sparse_attention(q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.tile_seq, layout.tile_row,
                           idx, cnt, bs, 0.11, out=out, lse=lse)
    ref = naive_block_sparse_attention(q, k, v, layout, idx, cnt, 0.11)
    assert not out.isnan().any(), "every output row must be written"
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[dtype], rtol=0)
    assert torch.isfinite(lse).all()
    if density == 1.0:
        dense = dense_reference(q, k, v, q_lens, k_lens, 0.11)
        torch.testing.assert_close(out.float(), dense, atol=ATOL[dtype], rtol=0)


def test_block_sparse_attention_lse_is_row_logsumexp():
    torch.manual_seed(1)
    layout = BatchLayout.build([20, 50], [60, 50], 16, "cpu")
    q = torch.randn(70, 2, 64, dtype=torch.float16)
    k = torch.randn(110, 1, 64, dtype=torch.float16)
    idx, cnt = random_block_lists(layout, 2, 1.0)
    lse = torch.full((2, 70), float("nan"))
    block_sparse_attention(q, k, k, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.tile_seq, layout.tile_row,
                           idx, cnt, 16, 0.2, lse=lse)
    expect = []
    for qs, ks, ctx in ((q[:20], k[:60], 40), (q[20:], k[60:], 0)):
        s = 0.2 * qs.float().transpose(0, 1) @ ks.float().transpose(0, 1).transpose(1, 2)
        mask = torch.arange(ks.shape[0])[None, :] <= torch.arange(ctx, ctx + qs.shape[0])[:, None]
        expect.append(torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1))
    torch.testing.assert_close(lse, torch.cat(expect, 1), atol=1e-3, rtol=0)


@pytest.mark.parametrize("n_probe,k_len,bs,hq,h", [(16, 16, 16, 2, 2), (20, 200, 32, 4, 2), (64, 131, 64, 2, 1)])
def test_probe_stats_matches_naive(n_probe, k_len, bs, hq, h):
    torch.manual_seed(k_len)
    q = torch.randn(n_probe, hq, 64, dtype=torch.bfloat16)
    k = torch.randn(k_len, h, 64, dtype=torch.bfloat16)
    m, l = probe_stats(q, k, bs, 0.125)
    m_ref, l_ref = naive_probe_stats(q, k, bs, 0.125)
    assert torch.equal(torch.isinf(m), torch.isinf(m_ref))
    finite = torch.isfinite(m_ref)
    torch.testing.assert_close(m[finite], m_ref[finite], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(l, l_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("first_row,num_rows,nb,pooled,dense_from", [
    (0, 7, 7, True, 5), (3, 4, 7, True, None), (2, 9, 11, False, 9)])
def test_block_lists_match_naive_mask(first_row, num_rows, nb, pooled, dense_from):
    from vllm_flexprefill.kernels.block_lists import write_block_lists
    from vllm_flexprefill.kernels.naive import naive_block_mask
    from vllm_flexprefill.patterns.layout import mask_to_lists

    torch.manual_seed(nb)
    hq, first_tile, tiles = 4, 2, num_rows + 3
    args = dict(keep_v=torch.rand(hq, nb) < 0.3, keep_s=torch.rand(hq, nb) < 0.3, dense_from=dense_from)
    if pooled:
        args.update(pooled=torch.rand(hq, num_rows * nb), threshold=torch.rand(hq),
                    query_aware=torch.tensor([True, False, True, False]))
    for dense in (False, True):
        kw = {} if dense else args
        idx = torch.full((hq, tiles, nb + 2), -1, dtype=torch.int32)
        cnt = torch.full((hq, tiles), 77, dtype=torch.int32)
        write_block_lists(idx, cnt, first_tile, first_row, num_rows, nb, **kw)
        ref_idx, ref_cnt = mask_to_lists(naive_block_mask(first_row, num_rows, nb, **kw).expand(hq, -1, -1))
        rows = slice(first_tile, first_tile + num_rows)
        assert torch.equal(cnt[:, rows], ref_cnt)
        assert torch.equal(idx[:, rows, :nb], ref_idx)
        assert (idx[:, rows, nb:] == -1).all() and (cnt[:, :first_tile] == 77).all(), "other tiles untouched"


def test_coverage_threshold_matches_sorted_prefix():
    from vllm_flexprefill.kernels.block_lists import coverage_threshold
    from vllm_flexprefill.kernels.naive import naive_coverage_threshold

    torch.manual_seed(0)
    pooled = torch.softmax(torch.randn(6, 5, 40) * 3, -1).reshape(6, 200)
    qa = torch.tensor([True, True, False, True, True, True])
    for gamma in (0.5, 0.9, 0.99):
        got = coverage_threshold(pooled, qa, gamma * 5)
        ref = naive_coverage_threshold(pooled, qa, gamma * 5)
        assert torch.equal(got >= 2, ref >= 2)
        assert torch.equal(pooled >= got[:, None], pooled >= ref[:, None]), "same blocks kept"
        kept = torch.where(pooled >= got[:, None], pooled, 0.0).sum(-1)
        assert (kept[qa] >= gamma * 5 - 1e-4).all()
