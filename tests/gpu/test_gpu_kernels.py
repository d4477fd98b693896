"""Triton kernels and the whole method on CUDA: against the PyTorch twins and dense SDPA."""

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from reference import ATOL, PLANTED_REL_ERR, rel_err
from synthetic import paged_cache, planted_inputs, random_block_lists

from vllm_flexprefill import flex_prefill_attention, flex_prefill_attention_varlen, flex_prefill_stats
from vllm_flexprefill.config import FlexPrefillConfig
from vllm_flexprefill.estimation import estimate_blocks, torch_ops, triton_ops
from vllm_flexprefill.kernels.block_sparse_attn import block_sparse_attention
from vllm_flexprefill.kernels.configs import row_alignment
from vllm_flexprefill.kernels.naive import naive_block_sparse_attention, naive_probe_stats
from vllm_flexprefill.kernels.probe import probe_stats
from vllm_flexprefill.layout.batch import BatchLayout
from vllm_flexprefill.patterns.naive import naive_select_blocks

DEV = "cuda"


def cu(lens):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bs,d,density", [(128, 128, 0.3), (64, 64, 0.5), (128, 64, 1.0), (64, 256, 0.2),
                                          (128, 256, 0.1)])
def test_block_sparse_attention_matches_naive(bs, d, density, dtype):
    torch.manual_seed(bs + d)
    q_lens, k_lens = [1000, 333, 1], [1000, 1700, 300]
    layout = BatchLayout.build(q_lens, k_lens, bs, DEV)
    q = torch.randn(sum(q_lens), 8, d, dtype=dtype, device=DEV)
    k = torch.randn(sum(k_lens), 2, d, dtype=dtype, device=DEV)
    v = torch.randn(sum(k_lens), 2, d, dtype=dtype, device=DEV)
    idx, cnt = random_block_lists(layout, 8, density)
    out = torch.full_like(q, float("nan"))
    block_sparse_attention(q, k, v, *layout.grid(),
                           idx, cnt, bs, d ** -0.5, out=out)
    ref = naive_block_sparse_attention(q, k, v, *layout.grid(), idx, cnt, layout.block_size, d ** -0.5)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("bs,d", [(128, 128), (64, 64), (128, 64)])
def test_kernels_read_a_paged_cache_in_place(bs, d):
    # compiled with the rows' alignment (vectorised loads): the same results as packed keys
    torch.manual_seed(bs + d)
    q_lens, k_lens = [1000, 333, 1], [1000, 1700, 300]
    layout = BatchLayout.build(q_lens, k_lens, bs, DEV)
    q = torch.randn(sum(q_lens), 8, d, dtype=torch.bfloat16, device=DEV)
    k = torch.randn(sum(k_lens), 2, d, dtype=torch.bfloat16, device=DEV)
    v = torch.randn(sum(k_lens), 2, d, dtype=torch.bfloat16, device=DEV)
    key_cache, value_cache, rows = paged_cache(k, v, k_lens)
    assert row_alignment(key_cache, rows) == 16
    idx, cnt = random_block_lists(layout, 8, 0.4)
    args = (*layout.grid(), idx, cnt, bs, d ** -0.5)
    packed = block_sparse_attention(q, k, v, *args)
    out = torch.full_like(q, float("nan"))
    block_sparse_attention(q, key_cache, value_cache, *args, out=out, k_rows=rows)
    assert torch.equal(out, packed)
    for got, want in zip(probe_stats(q, key_cache, layout, d ** -0.5, k_rows=rows),
                         probe_stats(q, k, layout, d ** -0.5)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("bs,d", [(128, 128), (128, 64), (64, 64)])
def test_dense_tiles_in_segments_equal_one_program_per_tile(bs, d):
    # compiled: the probe rows (every causal block) cut into segments and merged
    torch.manual_seed(d)
    q_lens, k_lens = [2000, 777], [20000, 777]
    layout = BatchLayout.build(q_lens, k_lens, bs, DEV)
    q = torch.randn(sum(q_lens), 8, d, dtype=torch.bfloat16, device=DEV)
    k = torch.randn(sum(k_lens), 2, d, dtype=torch.bfloat16, device=DEV)
    v = torch.randn(sum(k_lens), 2, d, dtype=torch.bfloat16, device=DEV)
    idx, cnt = random_block_lists(layout, 8, 1.0)  # every causal block
    split = layout.tail_split([(20000 - 128) // bs, None], seg_blocks=8)
    assert split is not None and split.segments.shape[1] >= 8
    args = (*layout.grid(), idx, cnt, bs, d ** -0.5)
    whole = block_sparse_attention(q, k, v, *args)
    cut = block_sparse_attention(q, k, v, *args, out=torch.full_like(q, float("nan")), split=split)
    assert not cut.isnan().any()
    torch.testing.assert_close(cut.float(), whole.float(), atol=ATOL[torch.bfloat16], rtol=0)


@pytest.mark.parametrize("bs,d", [(128, 128), (64, 128), (128, 64)])
def test_probe_stats_matches_naive(bs, d):
    # one launch for a batch: a chunk of a long prompt, a dense short one, an odd-length prompt
    torch.manual_seed(bs + d)
    q_lens, k_lens = [128, 300, 3000], [8192, 300, 4097]
    layout = BatchLayout.build(q_lens, k_lens, bs, DEV, [True, False, True])
    q = torch.randn(sum(q_lens), 9, d, dtype=torch.bfloat16, device=DEV)
    k = torch.randn(sum(k_lens), 3, d, dtype=torch.bfloat16, device=DEV)
    m, l, *means = probe_stats(q, k, layout, d ** -0.5)
    m_ref, l_ref, *means_ref = naive_probe_stats(q, k, layout, d ** -0.5)
    assert torch.equal(torch.isinf(m), torch.isinf(m_ref))
    finite = torch.isfinite(m_ref)
    torch.testing.assert_close(m[finite], m_ref[finite], atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(l, l_ref, atol=1e-3, rtol=2e-3)
    for got, want in zip(means, means_ref):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ops", [torch_ops, triton_ops], ids=["torch-twins", "triton-kernels"])
@pytest.mark.parametrize("tau", [0.1, 0.8])
def test_gpu_estimator_matches_spec(tau, ops):
    # one batch: a prompt, a chunk of a longer one, a dense short prompt, an odd-length chunk
    q_lens, k_lens = [4096, 1500, 300, 777], [4096, 6000, 300, 9001]
    q, k, _ = planted_inputs(q_lens, k_lens, 8, 2, 128, device=DEV, seed=7)
    layout = BatchLayout.build(q_lens, k_lens, 128, DEV, [True, True, False, True])
    cfg = FlexPrefillConfig(gamma=0.9, tau=tau, min_budget=512, sparse_block_size=128, min_sparse_tokens=0)
    spec = naive_select_blocks(q, k, layout, cfg, 128 ** -0.5)
    got = estimate_blocks(q, k, layout, cfg, 128 ** -0.5, ops=ops())
    assert torch.equal(got.query_aware, spec.query_aware)
    # bf16 scores on the tensor cores may reorder near-equal blocks; allow a tiny disagreement
    differ = (got.padded(layout) != spec.padded(layout)).any(-1).float().mean().item()
    assert differ < 0.01, f"{differ:.2%} of (head, tile) block lists differ from the spec"


def sdpa_causal(q, k, v):
    g = q.shape[2] // k.shape[2]
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(g, 1), v.transpose(1, 2).repeat_interleave(g, 1),
        is_causal=True).transpose(1, 2)


def test_pooled_maps_and_thresholds_across_programs():
    # each head's threshold is found by whichever of its row programs finishes last, over rows
    # that other programs wrote: long maps (up to 256 rows), every head query-aware, several runs.
    # The bisection's contract, checked in float64 on the finished map: the entries >= t carry
    # the goal, those >= t x (1 + 1e-5) do not (one interval of 24 halvings is 5.2e-6 wide).
    # A threshold found before some rows were written misses by about a whole row (1 / rows of
    # the goal); fp32 sums in another order move the mass by far less than the 1e-5 allowed.
    from vllm_flexprefill.kernels.block_lists import pooled_map
    from vllm_flexprefill.kernels.naive import naive_pooled_map

    torch.manual_seed(11)
    layout = BatchLayout.build([8192, 5000, 32768], [16384, 5000, 32768], 128, DEV)
    seqs = layout.sparse_seqs()
    q = (4 * torch.randn(sum(layout.q_lens), 16, 128, device=DEV)).bfloat16()
    k_bar = torch.randn(seqs.num_blocks, 4, 128, device=DEV)
    qa = torch.ones(3, 16, dtype=torch.int8, device=DEV)
    want, _ = naive_pooled_map(q, k_bar, qa.bool(), layout, 128 ** -0.5, 0.9)
    for _ in range(5):
        got, got_t = pooled_map(q, k_bar, qa, layout, 128 ** -0.5, 0.9)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        for j, s in enumerate(seqs.seqs):
            rows = layout.first_tile[s + 1] - layout.first_tile[s]
            m = got[:, seqs.p_start[j]:seqs.p_start[j] + rows * layout.num_key_blocks(s)].double()
            t = got_t[s].double()[:, None]
            goal = 0.9 * rows
            kept = torch.where(m >= t, m, 0.0).sum(-1)
            over = torch.where(m >= t * (1 + 1e-5), m, 0.0).sum(-1)
            assert (kept >= goal * (1 - 1e-5)).all(), (s, kept - goal)
            assert (over < goal * (1 + 1e-5)).all(), (s, over - goal)


@pytest.mark.parametrize("n", [8192, 32768])
def test_exact_mode_equals_dense(n):
    torch.manual_seed(n)
    q = torch.randn(1, n, 32, 128, dtype=torch.bfloat16, device=DEV)
    k = torch.randn(1, n, 8, 128, dtype=torch.bfloat16, device=DEV)
    v = torch.randn(1, n, 8, 128, dtype=torch.bfloat16, device=DEV)
    out = flex_prefill_attention(q, k, v, {"min_budget": n, "min_sparse_tokens": 0})
    ref = sdpa_causal(q, k, v)
    assert rel_err(out, ref) < 1e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[torch.bfloat16], rtol=0)


@pytest.mark.parametrize("n", [8192, 32768, 131072])
def test_planted_structure_long(n):
    # a whole prompt plus a chunk that continues a cached context of the same length
    q_lens, k_lens = [n, 4096], [n, n]
    q, k, v = planted_inputs(q_lens, k_lens, 8, 2, 128, device=DEV, seed=n % 97, needles=12)
    cfg = FlexPrefillConfig(min_sparse_tokens=0)
    out = flex_prefill_attention_varlen(q, k, v, cu(q_lens), cu(k_lens), cfg)
    ref = torch.cat([
        sdpa_causal(q[None, :n], k[None, :n], v[None, :n])[0],
        flex_prefill_attention_varlen(q[n:], k[n:], v[n:], cu([4096]), cu([n]),
                                      {"min_budget": n, "min_sparse_tokens": 0}),
    ])
    stats = flex_prefill_stats(q, k, cu(q_lens), cu(k_lens), cfg)
    density = stats.density.mean().item()
    assert rel_err(out, ref) < PLANTED_REL_ERR, f"n={n} density={density:.3f}"
    assert density < 0.5, f"n={n} rel_err={rel_err(out, ref):.4f}"


def test_kernels_compiled_at_start_up_serve_other_lengths():
    # start-up compiles the sparse path once (attention.compile_kernels, counting as the
    # router's layers count); a later chunk of other lengths on a paged cache, planned as the
    # builder plans it, compiles nothing new (no specialisation on lengths)
    from vllm_flexprefill.attention import compile_kernels, plan_cuda, select_blocks, sparse_attention
    from vllm_flexprefill.backend.cost_routing import COUNT_SLOTS
    from vllm_flexprefill.kernels import block_lists, block_sparse_attn, head_select, probe
    from vllm_flexprefill.layout.paged import paged_rows

    cfg = FlexPrefillConfig(min_sparse_tokens=0)
    compile_kernels(8, 2, 128, cfg, torch.bfloat16, DEV, count_slots=COUNT_SLOTS)
    kernels = [probe.probe_kernel, head_select.head_select_kernel, block_lists.pooled_map_kernel,
               block_lists.block_lists_kernel,
               block_sparse_attn.block_sparse_attn_fwd_kernel]

    def compiled():
        return [len(k.device_caches[torch.cuda.current_device()][0]) for k in kernels]

    before = compiled()
    q_len, k_len = 3001, 20011
    q = torch.randn(q_len, 8, 128, dtype=torch.bfloat16, device=DEV)
    cache = torch.randn(2, -(-k_len // 16) + 3, 16, 2, 128, dtype=torch.bfloat16, device=DEV)
    positions = torch.arange(k_len, device=DEV)
    rows = paged_rows(cache[0], positions // 16 + 3, positions % 16)
    layout = BatchLayout.build([q_len], [k_len], 128, DEV)
    plan_cuda(layout)
    counter = torch.zeros(COUNT_SLOTS, dtype=torch.int32, device=DEV)
    selection = select_blocks(q, cache[0], layout, cfg, 128 ** -0.5, rows, count_into=counter)
    sparse_attention(q, cache[0], cache[1], layout, selection, 128 ** -0.5, k_rows=rows)
    assert compiled() == before


def test_memoised_launches_skip_tritons_binding_and_give_its_results(monkeypatch):
    # kernels/launch.py: once a variant is known, launches go to the compiled kernel directly
    # (no JITFunction.run), with the same results as Triton's own launch
    from triton.runtime.jit import JITFunction

    from vllm_flexprefill.kernels.launch import launcher

    torch.manual_seed(5)
    q_lens, k_lens = [1000, 333], [1000, 1700]
    layout = BatchLayout.build(q_lens, k_lens, 128, DEV)
    q = torch.randn(sum(q_lens), 8, 64, dtype=torch.bfloat16, device=DEV)
    k = torch.randn(sum(k_lens), 2, 64, dtype=torch.bfloat16, device=DEV)
    v = torch.randn(sum(k_lens), 2, 64, dtype=torch.bfloat16, device=DEV)
    idx, cnt = random_block_lists(layout, 8, 0.4)

    def attend():
        out = torch.full_like(q, float("nan"))
        return block_sparse_attention(q, k, v, *layout.grid(), idx, cnt, 128, 64 ** -0.5, out=out)

    launcher.cache_clear()
    through_triton = attend()
    bound = []
    run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **kw: bound.append(self) or run(self, *a, **kw))
    memoised = attend()
    assert bound == []
    assert torch.equal(memoised, through_triton)
    ref = naive_block_sparse_attention(q, k, v, *layout.grid(), idx, cnt, layout.block_size, 64 ** -0.5)
    torch.testing.assert_close(memoised.float(), ref.float(), atol=ATOL[torch.bfloat16], rtol=0)


def test_sparse_path_replays_in_a_cuda_graph():
    # no host synchronisation and no host-side shapes read from the GPU: the estimation and the
    # attention of a batch capture into a CUDA graph, and its replay gives the eager result
    from vllm_flexprefill.attention import plan_cuda, segment_plan, select_blocks, sparse_attention

    q_lens, k_lens = [3000, 500], [20000, 500]
    q, k, v = planted_inputs(q_lens, k_lens, 8, 2, 128, device=DEV, seed=3)
    layout = BatchLayout.build(q_lens, k_lens, 128, DEV)
    cfg = FlexPrefillConfig(min_sparse_tokens=0)
    plan_cuda(layout)  # the plans and the shared buffers, made before capture, as the builder does
    split = segment_plan(layout)

    def call():
        selection = select_blocks(q, k, layout, cfg, 128 ** -0.5)
        return selection, sparse_attention(q, k, v, layout, selection, 128 ** -0.5)

    eager_sel, eager_out = call()  # compiles and memoises the launches
    # (the graph's call writes the same buffers: keep the eager results apart)
    eager_sel = dataclasses.replace(eager_sel, block_cnt=eager_sel.block_cnt.clone(),
                                    query_aware=eager_sel.query_aware.clone())
    eager_out = eager_out.clone()
    assert split is not None, "the long sequence's probe rows run in segments"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_sel, graph_out = call()
    graph_out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graph_sel.block_cnt, eager_sel.block_cnt)
    assert torch.equal(graph_sel.query_aware, eager_sel.query_aware)
    assert torch.equal(graph_out, eager_out)


def test_layer_calls_sharing_a_steps_buffers_give_fresh_results():
    # the builder gives each step's layout a workspace (attention.plan_cuda): consecutive layer
    # calls write the same buffers, the counters of the threshold and segment merges included
    # (reset by their last program). Each call equals a call on a layout of its own buffers.
    from vllm_flexprefill.attention import plan_cuda, select_blocks, sparse_attention
    from vllm_flexprefill.layout.workspace import buffers

    q_lens, k_lens = [4000, 700, 300], [24000, 700, 300]
    shared = BatchLayout.build(q_lens, k_lens, 128, DEV, sparse=[True, True, False])
    fresh = BatchLayout.build(q_lens, k_lens, 128, DEV, sparse=[True, True, False])
    plan_cuda(shared)
    assert buffers(shared) is not buffers(fresh)
    cfg = FlexPrefillConfig(min_sparse_tokens=0, tau=0.3)
    for seed in range(3):
        q, k, v = planted_inputs(q_lens, k_lens, 16, 4, 128, device=DEV, seed=seed)
        want_sel = select_blocks(q, k, fresh, cfg, 128 ** -0.5)
        want = sparse_attention(q, k, v, fresh, want_sel, 128 ** -0.5)
        counts = torch.zeros(32, dtype=torch.int32, device=DEV)  # the router's counters, as the backend passes them
        got_sel = select_blocks(q, k, shared, cfg, 128 ** -0.5, count_into=counts)
        got = sparse_attention(q, k, v, shared, got_sel, 128 ** -0.5)
        assert torch.equal(got_sel.block_cnt, want_sel.block_cnt), seed
        assert counts.sum() == want_sel.block_cnt.sum(), "every program's atomic add landed"
        assert torch.equal(got_sel.query_aware, want_sel.query_aware), seed
        assert not got_sel.query_aware[2].any(), "a dense sequence's flags stay zero"
        assert torch.equal(got, want), seed
    assert all((t == 0).all() for key, t in buffers(shared).tensors.items() if key[0].endswith("done"))
