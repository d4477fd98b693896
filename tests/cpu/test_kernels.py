"""Triton kernels against their PyTorch twins on identical inputs (Triton interpreter)."""

import pytest
import torch
from reference import ATOL, dense_reference
from synthetic import paged_cache, planted_inputs, random_block_lists

from vllm_flexprefill.kernels.block_sparse_attn import block_sparse_attention
from vllm_flexprefill.kernels.configs import row_alignment
from vllm_flexprefill.kernels.naive import naive_block_sparse_attention, naive_probe_stats
from vllm_flexprefill.kernels.probe import probe_stats
from vllm_flexprefill.layout.batch import BatchLayout
from vllm_flexprefill.layout.lists import BlockSelection
from vllm_flexprefill.layout.paged import rows_of

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
    block_sparse_attention(q, k, v, *layout.grid(),
                           idx, cnt, bs, 0.11, out=out, lse=lse)
    ref = naive_block_sparse_attention(q, k, v, *layout.grid(), idx, cnt, layout.block_size, 0.11)
    assert not out.isnan().any(), "every output row must be written"
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[dtype], rtol=0)
    assert torch.isfinite(lse).all()
    if density == 1.0:
        dense = dense_reference(q, k, v, q_lens, k_lens, 0.11)
        torch.testing.assert_close(out.float(), dense, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("how", ["sub-tiles", "v-strides-differ"])
def test_packed_keys_by_computed_addresses_match_naive(how):
    """Packed keys go through row offsets like a paged cache unless a block is several
    sub-tiles or k and v have different strides: then the kernel computes the addresses."""
    torch.manual_seed(3)
    q_lens, k_lens, bs = [37, 100], [37, 181], 32
    layout = BatchLayout.build(q_lens, k_lens, bs, "cpu")
    q = torch.randn(sum(q_lens), 4, 64, dtype=torch.bfloat16)
    k = torch.randn(sum(k_lens), 2, 64, dtype=torch.bfloat16)
    v = torch.randn(sum(k_lens), 2, 64, dtype=torch.bfloat16)
    config = None
    if how == "sub-tiles":
        config = {"BLOCK_N": bs // 2, "num_warps": 4, "num_stages": 2}
    else:
        v = torch.randn(sum(k_lens), 3, 64, dtype=torch.bfloat16)[:, :2]  # rows of 3 heads: other strides
    idx, cnt = random_block_lists(layout, 4, 0.5)
    out = torch.full_like(q, float("nan"))
    block_sparse_attention(q, k, v, *layout.grid(),
                           idx, cnt, bs, 0.11, out=out, config=config)
    ref = naive_block_sparse_attention(q, k, v, *layout.grid(), idx, cnt, layout.block_size, 0.11)
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[torch.bfloat16], rtol=0)


def test_block_sparse_attention_lse_is_row_logsumexp():
    torch.manual_seed(1)
    layout = BatchLayout.build([20, 50], [60, 50], 16, "cpu")
    q = torch.randn(70, 2, 64, dtype=torch.float16)
    k = torch.randn(110, 1, 64, dtype=torch.float16)
    idx, cnt = random_block_lists(layout, 2, 1.0)
    lse = torch.full((2, 70), float("nan"))
    block_sparse_attention(q, k, k, *layout.grid(),
                           idx, cnt, 16, 0.2, lse=lse)
    expect = []
    for qs, ks, ctx in ((q[:20], k[:60], 40), (q[20:], k[60:], 0)):
        s = 0.2 * qs.float().transpose(0, 1) @ ks.float().transpose(0, 1).transpose(1, 2)
        mask = torch.arange(ks.shape[0])[None, :] <= torch.arange(ctx, ctx + qs.shape[0])[:, None]
        expect.append(torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1))
    torch.testing.assert_close(lse, torch.cat(expect, 1), atol=1e-3, rtol=0)


@pytest.mark.parametrize("paged", [False, True], ids=["packed", "paged"])
def test_dense_tiles_in_segments_match_naive(paged):
    # the probe rows keep every causal block; they run as segments of key blocks, merged by
    # their log-sum-exps: the same output and lse as one program per tile
    torch.manual_seed(7)
    q_lens, k_lens, bs, hq, h, d = [70, 41, 150], [300, 41, 150], 16, 4, 2, 64
    layout = BatchLayout.build(q_lens, k_lens, bs, "cpu", sparse=[True, True, False])
    q = torch.randn(sum(q_lens), hq, d, dtype=torch.bfloat16)
    k = torch.randn(sum(k_lens), h, d, dtype=torch.bfloat16)
    v = torch.randn(sum(k_lens), h, d, dtype=torch.bfloat16)
    idx, cnt = random_block_lists(layout, hq, 0.3)
    # sequence 0 has tiles 0-4 at block rows 14-18: rows 16-18 (tiles 2-4, 17-19 blocks) are
    # cut; sequence 1's rows 1-2 are too short to cut; sequence 2 has none
    dense_from = [16, 1, None]
    split = layout.tail_split(dense_from, seg_blocks=4, max_segments=3)
    assert split.split_tiles.tolist() == [2, 3, 4] and split.segments.shape[1] == 9
    assert split.segments[0].tolist() == [2] * 3 + [3] * 3 + [4] * 3
    assert split.segments[2, 2::3].tolist() == [17, 18, 19]  # each tile's last segment ends at its diagonal
    nb = layout.num_key_blocks(0)
    for t in (2, 3, 4):  # the cut tiles' lists: every causal block
        start = int(layout.tile_list[t])
        idx[:, start:start + nb] = -1
        idx[:, start:start + t + 15] = torch.arange(t + 15)
        cnt[:, t] = t + 15
    keys, values, rows = (k, v, None) if not paged else paged_cache(k, v, k_lens)
    args = (*layout.grid(), idx, cnt, bs, 0.11)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((hq, q.shape[0]), float("nan"))
    block_sparse_attention(q, keys, values, *args, out=out, lse=lse, k_rows=rows, split=split)
    ref = naive_block_sparse_attention(q, k, v, *layout.grid(), idx, cnt, layout.block_size, 0.11)
    assert not out.isnan().any(), "every output row must be written"
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[torch.bfloat16], rtol=0)
    whole_lse = torch.full_like(lse, float("nan"))
    block_sparse_attention(q, k, v, *args, lse=whole_lse)
    torch.testing.assert_close(lse, whole_lse, atol=1e-4, rtol=0)
    assert layout.tail_split(dense_from, seg_blocks=4, max_segments=3) is split  # made once per layout
    assert layout.tail_split([None, None, None], seg_blocks=4) is None


# batches: q_lens, k_lens, block size, HQ, H, which sequences are sparse (the others are skipped)
PROBE_BATCHES = [
    pytest.param([16], [16], 16, 2, 2, None, id="one-block"),
    pytest.param([20, 131], [200, 131], 32, 4, 2, None, id="chunk-and-prompt"),
    pytest.param([300, 50, 7], [1000, 50, 90], 64, 4, 2, [True, False, True], id="dense-between-odd"),
]


@pytest.mark.parametrize("q_lens,k_lens,bs,hq,h,sparse", PROBE_BATCHES)
def test_probe_stats_and_means_match_naive(q_lens, k_lens, bs, hq, h, sparse):
    torch.manual_seed(sum(k_lens))
    layout = BatchLayout.build(q_lens, k_lens, bs, "cpu", sparse)
    q = torch.randn(sum(q_lens), hq, 64, dtype=torch.bfloat16)
    k = torch.randn(sum(k_lens), h, 64, dtype=torch.bfloat16)
    got = probe_stats(q, k, layout, 0.125)
    want = naive_probe_stats(q, k, layout, 0.125)
    m, l, m_ref, l_ref = got[0], got[1], want[0], want[1]
    assert m.shape == m_ref.shape == (hq, layout.sparse_seqs().num_blocks, bs)
    assert torch.equal(torch.isinf(m), torch.isinf(m_ref))
    finite = torch.isfinite(m_ref)
    torch.testing.assert_close(m[finite], m_ref[finite], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(l, l_ref, atol=1e-4, rtol=1e-4)
    for name, a, b in zip(("k_bar", "q_probe_bar"), got[2:], want[2:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("blocks", [1, 3])
def test_probe_results_do_not_depend_on_blocks_per_program(blocks):
    """Runs of 1 or 3 key blocks per program (uneven against 16 and 2 blocks) give the default's
    results, on packed keys and on a paged cache (whose rows a run reads a block ahead)."""
    q_lens, k_lens = [300, 50, 7], [1000, 50, 90]
    layout = BatchLayout.build(q_lens, k_lens, 64, "cpu", [True, False, True])
    q = torch.randn(sum(q_lens), 4, 64, dtype=torch.bfloat16)
    k = torch.randn(sum(k_lens), 2, 64, dtype=torch.bfloat16)
    key_cache, _, rows = paged_cache(k, k, k_lens)
    want = probe_stats(q, k, layout, 0.125)
    config = {"BLOCKS": blocks, "num_warps": 4, "num_stages": 2}
    for got in (probe_stats(q, k, layout, 0.125, config=config),
                probe_stats(q, key_cache, layout, 0.125, k_rows=rows, config=config)):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_kernels_read_a_paged_cache_in_place():
    # the CUDA backend's path: keys and values stay in their pages; unused slots hold NaN
    torch.manual_seed(5)
    q_lens, k_lens, bs, hq, h, d = [37, 100], [37, 181], 32, 4, 2, 64
    layout = BatchLayout.build(q_lens, k_lens, bs, "cpu")
    q = torch.randn(sum(q_lens), hq, d, dtype=torch.bfloat16)
    k = torch.randn(sum(k_lens), h, d, dtype=torch.bfloat16)
    v = torch.randn(sum(k_lens), h, d, dtype=torch.bfloat16)
    key_cache, value_cache, rows = paged_cache(k, v, k_lens)
    assert torch.equal(rows_of(key_cache, rows), k) and torch.equal(rows_of(value_cache, rows), v)
    idx, cnt = random_block_lists(layout, hq, 0.5)
    args = (*layout.grid(), idx, cnt, bs, 0.11)
    packed = block_sparse_attention(q, k, v, *args)
    paged = block_sparse_attention(q, key_cache, value_cache, *args, k_rows=rows)
    assert torch.equal(paged, packed)
    twin = naive_block_sparse_attention(q, key_cache, value_cache, *layout.grid(), idx, cnt, layout.block_size, 0.11, k_rows=rows)
    torch.testing.assert_close(paged.float(), twin.float(), atol=ATOL[torch.bfloat16], rtol=0)
    # the probe of both sequences
    for probe in (probe_stats, naive_probe_stats):
        for got, want in zip(probe(q, key_cache, layout, 0.125, k_rows=rows), probe(q, k, layout, 0.125)):
            assert torch.equal(got, want)


def test_paged_rows_are_declared_aligned_only_when_every_stride_is():
    # the kernels tell the compiler that K/V rows start at multiples of ROW_ALIGN elements
    # (vectorised loads); a wrong claim would read misaligned rows on the GPU
    k = torch.randn(300, 2, 64, dtype=torch.bfloat16)
    key_cache, _, rows = paged_cache(k, k, [300])
    assert row_alignment(key_cache, rows) == 16
    assert bool((rows % 16 == 0).all())
    assert row_alignment(key_cache, None) == 1  # packed keys: the kernel computes the offsets
    # rows 72 elements apart (a padded head_dim): offsets are multiples of 8 only
    padded = torch.zeros(20, 16, 2, 72, dtype=torch.bfloat16)[..., :64]
    assert row_alignment(padded, rows) == 1


@pytest.mark.parametrize("q_lens,k_lens,tau,budgets,chunk", [
    ([700, 5], [700, 300], 0.1, (2, 9), 1024), ([5, 90], [300, 90], 0.9, (1, 4), 1024),
    ([1000, 33], [1000, 1000], 0.0, (3, None), 1024),
    ([1000], [1000], 0.1, (2, 32), 8),  # bisection over several chunks (more blocks than one sort holds)
    ([200, 700], [9000, 700], 0.1, (2, 90), 1024),  # 282 blocks: the full-width sort; 22: the quarter-width one
    ([17, 60], [2000, 60], 0.9, (40, 40), 32),  # budget beyond the block count
])
def test_head_select_matches_naive(q_lens, k_lens, tau, budgets, chunk):
    from vllm_flexprefill.kernels.head_select import select_heads
    from vllm_flexprefill.kernels.naive import naive_select_heads

    q, k, _ = planted_inputs(q_lens, k_lens, 4, 2, 64, dtype=torch.bfloat16, seed=sum(k_lens))
    # a dense sequence between the sparse ones: no selection, query_aware 0
    layout = BatchLayout.build([*q_lens, 40], [*k_lens, 40], 32, "cpu", [True] * len(q_lens) + [False])
    q, k = torch.cat([q, torch.randn(40, 4, 64).bfloat16()]), torch.cat([k, torch.randn(40, 2, 64).bfloat16()])
    m, l, k_bar, q_probe_bar = naive_probe_stats(q, k, layout, 0.125)
    args = (m, l, k_bar, q_probe_bar, layout, 0.125, 0.9, tau, *budgets)
    got = select_heads(*args, chunk=chunk)
    want = naive_select_heads(*args)
    for g, w in zip(got, want):
        assert torch.equal(g.bool(), w)
    assert not got[2][-1].any()


def pooled_layout():
    # two sparse sequences (a chunk of a longer prompt, a short prompt) around a dense one
    return BatchLayout.build([40, 100, 140], [130, 100, 4200], 32, "cpu", [True, False, True])


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_pooled_map_and_thresholds_match_naive_on_query_aware_heads(gamma):
    from vllm_flexprefill.kernels.block_lists import pooled_map
    from vllm_flexprefill.kernels.naive import naive_coverage_threshold, naive_pooled_map

    torch.manual_seed(3)
    layout = pooled_layout()
    seqs = layout.sparse_seqs()
    # the map's rows take their tiles' mean queries from q (partial first and last tiles too);
    # large means give peaked maps, whose thresholds keep few blocks
    q = (4 * torch.randn(sum(layout.q_lens), 4, 64)).bfloat16()
    k_bar = torch.randn(seqs.num_blocks, 2, 64)
    qa = torch.tensor([[True, False, True, True], [True] * 4, [False, True, True, False]])
    got, got_t = pooled_map(q, k_bar, qa, layout, 0.125, gamma)
    want, want_t = naive_pooled_map(q, k_bar, qa, layout, 0.125, gamma)
    assert got.shape == want.shape == (4, seqs.pooled_size) and got_t.shape == want_t.shape == (3, 4)
    # the bisection's threshold against the sorted prefix's, on the kernel's own map
    ref_t = naive_coverage_threshold(got, qa, layout, gamma)
    for j, s in enumerate(seqs.seqs):
        rows = layout.first_tile[s + 1] - layout.first_tile[s]
        part = slice(seqs.p_start[j], seqs.p_start[j] + rows * layout.num_key_blocks(s))
        torch.testing.assert_close(got[qa[s], part], want[qa[s], part], atol=1e-6, rtol=1e-5)
        assert torch.allclose(want[:, part].view(4, rows, -1).sum(-1), torch.ones(4, rows))
        assert torch.equal(got_t[s] == 2.0, ~qa[s]), "heads that are not query-aware keep nothing"
        assert ((got_t[s][qa[s]] > 0) & (got_t[s][qa[s]] <= 1)).all(), got_t[s]
        m = got[:, part]
        assert torch.equal((m >= got_t[s][:, None])[qa[s]], (m >= ref_t[s][:, None])[qa[s]]), "same blocks kept"
        kept = torch.where(m >= got_t[s][:, None], m, 0.0).sum(-1)
        assert (kept[qa[s]] >= gamma * rows - 1e-4).all()
        if gamma < 0.99:  # the thresholds leave blocks out: the test sees a real cut
            assert ((m >= got_t[s][:, None]).sum(-1) < (m > 0).sum(-1))[qa[s]].any()


@pytest.mark.parametrize("pooled", [True, False])
def test_block_lists_match_naive(pooled):
    from vllm_flexprefill.kernels.block_lists import write_block_lists
    from vllm_flexprefill.kernels.naive import naive_write_block_lists

    torch.manual_seed(7)
    layout = pooled_layout()
    seqs, hq = layout.sparse_seqs(), 4
    args = dict(keep_v=torch.rand(hq, seqs.num_blocks) < 0.3, keep_s=torch.rand(hq, seqs.num_blocks) < 0.3)
    if pooled:
        args.update(query_aware=torch.rand(layout.num_seqs, hq) < 0.5, pooled=torch.rand(hq, seqs.pooled_size),
                    threshold=torch.rand(layout.num_seqs, hq))
    for kw in (args, {}):  # the estimation's lists; every sequence dense
        # poisoned: every entry must be written, the lists' -1 padding included
        idx = torch.full((hq, layout.list_size), -7, dtype=torch.int32)
        cnt = torch.full((hq, layout.num_tiles), 77, dtype=torch.int32)
        off = torch.full((hq, layout.num_tiles), 77, dtype=torch.int32)
        ref_idx, ref_cnt, ref_off = idx.clone(), cnt.clone(), off.clone()
        # the router's counters: the lists' lengths add up in them, over every counter
        counts, ref_counts = torch.full((5,), 3, dtype=torch.int32), torch.full((5,), 3, dtype=torch.int32)
        write_block_lists(idx, cnt, off, layout, **kw, count_into=counts)
        naive_write_block_lists(ref_idx, ref_cnt, ref_off, layout, **kw, count_into=ref_counts)
        assert torch.equal(cnt, ref_cnt) and torch.equal(idx, ref_idx) and torch.equal(off, ref_off)
        assert torch.equal(off, cnt - 1), "the count without the diagonal"
        assert counts.sum() == ref_counts.sum() == 15 + cnt.sum() and (counts > 3).sum() > 1, counts
        assert not (idx == -7).any()
        padded = BlockSelection(idx, cnt, off, torch.zeros(1)).padded(layout)
        pos = torch.arange(layout.max_key_blocks)
        width = torch.tensor([layout.num_key_blocks(int(s)) for s in layout.tile_seq])
        assert torch.equal(padded < 0, pos[None, None, :] >= cnt[:, :, None]), "ids, then -1 to the width"
        for t in range(layout.num_tiles):
            assert (idx[:, layout.tile_list[t]:layout.tile_list[t] + width[t]] >= -1).all()
        assert (cnt[:, layout.first_tile[1]:layout.first_tile[2]] == layout.tile_row[
            layout.first_tile[1]:layout.first_tile[2]] + 1).all(), "the dense sequence keeps every causal block"


def test_compile_kernels_runs_a_long_and_a_short_paged_call(monkeypatch):
    # on the CPU it takes the PyTorch path: what it checks here is the calls it makes
    from vllm_flexprefill import attention
    from vllm_flexprefill.config import FlexPrefillConfig
    from vllm_flexprefill.kernels.configs import SEGMENT_BLOCKS

    calls, counted = [], []
    real, real_select = attention.sparse_attention, attention.select_blocks

    def spy(q, k, v, layout, selection, scale, out=None, k_rows=None, kernel="auto"):
        calls.append((layout.q_lens, layout.k_lens, k_rows is not None, tuple(k.shape), kernel))
        return real(q, k, v, layout, selection, scale, out=out, k_rows=k_rows, kernel=kernel)

    def select_spy(*args, count_into=None, **kwargs):
        counted.append(None if count_into is None else tuple(count_into.shape))
        return real_select(*args, count_into=count_into, **kwargs)

    monkeypatch.setattr(attention, "sparse_attention", spy)
    monkeypatch.setattr(attention, "select_blocks", select_spy)
    attention.compile_kernels(4, 2, 64, FlexPrefillConfig(sparse_block_size=16, min_sparse_tokens=0, kernel="fa4"),
                              torch.float32, "cpu", count_slots=32)
    n = (2 * SEGMENT_BLOCKS + 2) * 16
    assert calls == [((n,), (n,), True, (-(-n // 16), 16, 2, 64), "fa4"), ((48,), (48,), True, (3, 16, 2, 64), "fa4")]
    assert counted == [(32,)] * 2, "the estimation counts as the router's layers count (a variant of its own)"
