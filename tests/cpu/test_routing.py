"""Per-step planning of a mixed batch, and FlexPrefill over a shuffled paged KV cache.

Follows vLLM's own backend tests: context keys/values scattered into randomly permuted
pages (page 0 unused), a batch mixing a decode, a fresh prompt, a chunked-prefill
continuation, a prefix-cache hit and a short prompt; the sparse requests' outputs are
compared with causal attention per request.
"""

import itertools

import torch
from reference import ATOL, dense_reference

from vllm_flexprefill.attention import select_blocks
from vllm_flexprefill.backend.routing import choose_sparse, dense_runs, plan_batch
from vllm_flexprefill.backend.sparse import choose_and_record, sparse_prefill
from vllm_flexprefill.config import FlexPrefillConfig
from vllm_flexprefill.stats import layer_index

PAGE = 16
#          decode   fresh   chunk   prefix-hit  short
Q_LENS = [1, 700, 300, 200, 50]
SEQ_LENS = [500, 700, 1000, 900, 50]


def paged_batch(seed=0):
    """Query rows for the batch, full-sequence K/V per request, and a shuffled paged cache."""
    g = torch.Generator().manual_seed(seed)
    hq, h, d = 4, 2, 64
    keys = [torch.randn(n, h, d, generator=g) for n in SEQ_LENS]
    values = [torch.randn(n, h, d, generator=g) for n in SEQ_LENS]
    query = torch.randn(sum(Q_LENS), hq, d, generator=g)
    pages_per_req = [-(-n // PAGE) for n in SEQ_LENS]
    perm = (torch.randperm(sum(pages_per_req), generator=g) + 1).tolist()  # page 0 stays unused
    num_pages = sum(pages_per_req) + 1
    key_cache = torch.full((num_pages, PAGE, h, d), float("nan"))
    value_cache = torch.full((num_pages, PAGE, h, d), float("nan"))
    block_table = torch.zeros(len(SEQ_LENS), max(pages_per_req), dtype=torch.int32)
    it = iter(perm)
    for i, n in enumerate(SEQ_LENS):
        for p in range(pages_per_req[i]):
            page = next(it)
            block_table[i, p] = page
            rows = slice(p * PAGE, min(n, (p + 1) * PAGE))
            key_cache[page, : rows.stop - rows.start] = keys[i][rows]
            value_cache[page, : rows.stop - rows.start] = values[i][rows]
    return query, keys, values, key_cache, value_cache, block_table


def test_choose_sparse_and_dense_runs():
    cfg = FlexPrefillConfig(min_sparse_tokens=600, min_sparse_query_tokens=100)
    sparse = choose_sparse(Q_LENS, SEQ_LENS, cfg, decode_threshold=1, fresh_only=False)
    assert sparse == [False, True, True, True, False]
    assert choose_sparse(Q_LENS, SEQ_LENS, cfg, decode_threshold=1, fresh_only=True) == \
        [False, True, False, False, False]
    assert dense_runs(sparse) == ((0, 1), (4, 5))
    assert dense_runs([False, False, True]) == ((0, 2),)
    assert dense_runs([True, True]) == ()


def test_sparse_requests_over_a_shuffled_paged_cache_match_causal_attention():
    query, keys, values, key_cache, value_cache, block_table = paged_batch()
    cfg = FlexPrefillConfig(min_budget=100000, min_sparse_tokens=600, min_sparse_query_tokens=100,
                            sparse_block_size=32)
    qsl = torch.tensor([0, *itertools.accumulate(Q_LENS)], dtype=torch.int32)
    plan = plan_batch(qsl, torch.tensor(SEQ_LENS), block_table, PAGE, cfg, decode_threshold=1)
    assert plan.requests == (1, 2, 3)
    assert plan.dense_runs == ((0, 1), (4, 5))
    (group,) = plan.groups
    assert group.requests == (1, 2, 3)
    assert group.q_rows == slice(1, 1201)
    # the gather the CUDA backend does in forward
    k = key_cache[group.kv_pages, group.kv_offsets]
    v = value_cache[group.kv_pages, group.kv_offsets]
    assert torch.equal(k, torch.cat([keys[i] for i in group.requests]))
    assert torch.equal(v, torch.cat([values[i] for i in group.requests]))
    out = torch.full((1200, 4, 64), float("nan"))
    sparse_prefill(query[group.q_rows], k, v, group, plan, 0.125, out=out)
    want = dense_reference(query[group.q_rows], k, v, [Q_LENS[i] for i in group.requests],
                           [SEQ_LENS[i] for i in group.requests], 0.125)
    torch.testing.assert_close(out, want, atol=ATOL[torch.float32], rtol=0)


def test_non_contiguous_sparse_requests_use_an_index():
    cfg = FlexPrefillConfig(min_sparse_tokens=600, min_sparse_query_tokens=100)
    q_lens, seq_lens = [700, 1, 300], [700, 400, 1000]
    qsl = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
    table = torch.arange(3 * 70, dtype=torch.int32).view(3, 70)
    plan = plan_batch(qsl, torch.tensor(seq_lens), table, PAGE, cfg, decode_threshold=1)
    assert plan.requests == (0, 2)
    (group,) = plan.groups
    assert torch.equal(group.q_rows, torch.cat([torch.arange(0, 700), torch.arange(701, 1001)]))
    assert plan.dense_runs == ((1, 2),)
    assert group.layout.q_lens == (700, 300) and group.layout.k_lens == (700, 1000)
    # token t of request 2 lives at page table[2, t // PAGE], offset t % PAGE
    t = torch.arange(1000)
    assert torch.equal(group.kv_pages[700:], table[2, t // PAGE].long())
    assert torch.equal(group.kv_offsets[700:], t % PAGE)


def test_sparse_requests_are_gathered_in_groups_of_bounded_keys():
    cfg = FlexPrefillConfig(min_sparse_tokens=600, min_sparse_query_tokens=100)
    q_lens, seq_lens = [700, 300, 1, 200, 900], [700, 1000, 50, 900, 2500]
    qsl = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
    table = torch.arange(5 * 160, dtype=torch.int32).view(5, 160)
    plan = plan_batch(qsl, torch.tensor(seq_lens), table, PAGE, cfg, decode_threshold=1, max_gather_tokens=1900)
    assert plan.requests == (0, 1, 3, 4)
    # 700 + 1000 fit; 900 starts a new group; 2500 exceeds the bound alone and is gathered alone
    assert [g.requests for g in plan.groups] == [(0, 1), (3,), (4,)]
    assert [len(g.kv_pages) for g in plan.groups] == [1700, 900, 2500]
    assert [g.q_rows for g in plan.groups] == [slice(0, 1000), slice(1001, 1201), slice(1201, 2101)]


def test_batches_without_long_prefills_are_left_to_the_dense_backend():
    cfg = FlexPrefillConfig(min_sparse_tokens=12288)
    qsl = torch.tensor([0, 1, 2, 5000], dtype=torch.int32)
    assert plan_batch(qsl, torch.tensor([9000, 100, 5000]), None, PAGE, cfg, decode_threshold=1) is None


def test_slice_requests_gives_metadata_of_a_request_range():
    import pytest

    pytest.importorskip("vllm")
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from vllm_flexprefill.backend.compat import slice_metadata

    qsl = torch.tensor([0, *itertools.accumulate(Q_LENS)], dtype=torch.int32)
    seq = torch.tensor(SEQ_LENS, dtype=torch.int32)
    table = torch.arange(5 * 70, dtype=torch.int32).view(5, 70)
    slots = torch.arange(int(qsl[-1]) + 8)  # padded past the last token
    cm = CommonAttentionMetadata(query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq, num_reqs=5,
                                 num_actual_tokens=int(qsl[-1]), max_query_len=700, max_seq_len=1000,
                                 block_table_tensor=table, slot_mapping=slots, seq_lens_cpu_upper_bound=seq)
    part, t0, t1 = slice_metadata(cm, 3, 5)
    assert (t0, t1) == (1001, 1251)
    assert part.num_reqs == 2 and part.num_actual_tokens == 250
    assert part.query_start_loc.tolist() == [0, 200, 250] == part.query_start_loc_cpu.tolist()
    assert part.seq_lens.tolist() == [900, 50] and part.max_seq_len == 900 and part.max_query_len == 200
    assert torch.equal(part.block_table_tensor, table[3:5])
    assert torch.equal(part.slot_mapping, slots[1001:1251])


def test_each_layer_chooses_blocks_with_its_own_gamma():
    query, _, _, key_cache, _, block_table = paged_batch(3)
    base = {"min_budget": 32, "min_sparse_tokens": 600, "min_sparse_query_tokens": 100, "sparse_block_size": 32}
    cfg = FlexPrefillConfig(gamma=0.5, layer_gamma={"2-3": 0.99}, **base)
    qsl = torch.tensor([0, *itertools.accumulate(Q_LENS)], dtype=torch.int32)
    plan = plan_batch(qsl, torch.tensor(SEQ_LENS), block_table, PAGE, cfg, decode_threshold=1)
    (group,) = plan.groups
    q, k = query[group.q_rows], key_cache[group.kv_pages, group.kv_offsets]
    assert layer_index("model.layers.2.self_attn.attn") == 2 and layer_index("lm_head") is None
    for name, gamma in [("model.layers.1.self_attn.attn", 0.5), ("model.layers.2.self_attn.attn", 0.99),
                        ("model.layers.4.self_attn.attn", 0.5), ("attn", 0.5)]:
        got = choose_and_record(q, k, group, plan, 0.125, name)
        want = select_blocks(q, k, group.layout, FlexPrefillConfig(gamma=gamma, **base), 0.125)
        assert torch.equal(got.block_cnt, want.block_cnt), name
    # the two gammas choose differently on this batch (else the test could not fail)
    low = choose_and_record(q, k, group, plan, 0.125, "model.layers.1.self_attn.attn")
    high = choose_and_record(q, k, group, plan, 0.125, "model.layers.3.self_attn.attn")
    assert high.block_cnt.sum() > low.block_cnt.sum()
