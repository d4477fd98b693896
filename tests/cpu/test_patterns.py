"""Pattern estimation: invariants of the selection, and the batched estimator against the spec."""

import pytest
import torch
from reference import ATOL
from synthetic import paged_cache, planted_inputs

from vllm_flexprefill.attention import dense_rows
from vllm_flexprefill.config import FlexPrefillConfig
from vllm_flexprefill.estimation import estimate_blocks, torch_ops, triton_ops
from vllm_flexprefill.kernels.naive import probe_one
from vllm_flexprefill.layout.batch import BatchLayout
from vllm_flexprefill.patterns.coverage import coverage_select, js_distance
from vllm_flexprefill.patterns.masses import probe_masses
from vllm_flexprefill.patterns.naive import naive_lines, naive_select_blocks

BS = 32


def test_js_distance_is_nan_free_and_bounded():
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    d = js_distance(p, q)
    assert torch.isfinite(d).all()
    assert d[0] == pytest.approx(torch.log(torch.tensor(2.0)).sqrt().item(), abs=1e-6)
    assert d[1] == pytest.approx(0.0, abs=1e-6)
    assert 0 < d[2] < d[0]


def test_coverage_select_reaches_gamma_with_fewest_blocks():
    torch.manual_seed(0)
    mass = torch.softmax(torch.randn(5, 40) * 2, -1)
    valid = torch.ones_like(mass, dtype=torch.bool)
    forced = torch.zeros_like(valid)
    forced[:, 0] = True
    sel = coverage_select(mass, valid, forced, 0.8, 1, 40)
    for row in range(5):
        chosen = mass[row][sel[row]]
        assert sel[row, 0], "forced block is always chosen"
        assert chosen.sum() >= 0.8 - 1e-6
        # dropping the lightest chosen non-forced block falls below gamma
        rest = mass[row][sel[row] & ~forced[row]]
        assert chosen.sum() - rest.min() < 0.8


def test_coverage_select_respects_budgets_and_validity():
    mass = torch.full((2, 10), 0.1)
    valid = torch.arange(10) < torch.tensor([[6], [10]])
    sel = coverage_select(mass, valid, torch.zeros(2, 10, dtype=torch.bool), 1.0, torch.tensor([2, 2]),
                          torch.tensor([3, 3]))
    assert sel.sum(-1).tolist() == [3, 3]
    assert not sel[0, 6:].any()
    sel = coverage_select(mass, valid, torch.zeros(2, 10, dtype=torch.bool), 0.01, 8, 9)
    assert sel.sum(-1).tolist() == [6, 8], "min budget is capped by the valid blocks"


def probe_distribution_from_scores(q, k, scale):
    """Dense fp32 vertical/slash masses for one head, to check probe_masses."""
    n_probe, k_len = q.shape[0], k.shape[0]
    probe_pos = torch.arange(k_len - n_probe, k_len)
    s = scale * q.float() @ k.float().T
    s = s.masked_fill(torch.arange(k_len)[None, :] > probe_pos[:, None], float("-inf"))
    a = torch.softmax(s, -1)
    nb = -(-k_len // BS)
    col = torch.arange(k_len) // BS
    vertical = torch.zeros(nb).index_add_(0, col, a.sum(0)) / n_probe
    off = (probe_pos // BS)[:, None] - col[None, :]
    slash = torch.zeros(nb).index_add_(0, off.clamp_min(0).flatten(), a.flatten()) / n_probe
    return vertical, slash


@pytest.mark.parametrize("n_probe,k_len", [(32, 200), (7, 7), (20, 97)])
def test_probe_masses_match_dense_probe(n_probe, k_len):
    torch.manual_seed(k_len)
    q = torch.randn(n_probe, 2, 64)
    k = torch.randn(k_len, 1, 64)
    m, l, *_ = probe_one(q, k, BS, 0.125)
    vertical, slash = probe_masses(m, l, n_probe, k_len, BS)
    for h in range(2):
        v_ref, s_ref = probe_distribution_from_scores(q[:, h], k[:, 0], 0.125)
        torch.testing.assert_close(vertical[h], v_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(slash[h], s_ref, atol=1e-5, rtol=0)
        assert vertical[h].sum() == pytest.approx(1.0, abs=1e-5)


CONFIGS = [
    pytest.param(FlexPrefillConfig(gamma=0.9, tau=0.0, min_budget=64, sparse_block_size=BS, min_sparse_tokens=0),
                 id="vertical-slash"),
    pytest.param(FlexPrefillConfig(gamma=0.95, tau=0.1, min_budget=None, max_budget=160, sparse_block_size=BS,
                                   min_sparse_tokens=0), id="capped"),
    pytest.param(FlexPrefillConfig(gamma=0.8, tau=0.8, min_budget=32, sparse_block_size=BS, min_sparse_tokens=0),
                 id="query-aware"),
]


def batch():
    q_lens, k_lens = [700, 300, 90], [700, 900, 90]
    q, k, _ = planted_inputs(q_lens, k_lens, 4, 2, 64, dtype=torch.bfloat16, seed=3)
    return q, k, BatchLayout.build(q_lens, k_lens, BS, "cpu")


@pytest.mark.parametrize("cfg", CONFIGS)
def test_selection_invariants(cfg):
    q, k, layout = batch()
    sel = naive_select_blocks(q, k, layout, cfg, 0.125)
    idx, cnt = sel.padded(layout), sel.block_cnt
    rows = layout.tile_row.long()
    for t in range(layout.num_tiles):
        r = rows[t].item()
        for h in range(q.shape[1]):
            ids = idx[h, t, :cnt[h, t]]
            assert (idx[h, t, cnt[h, t]:] == -1).all(), "padding is -1"
            assert torch.equal(ids, torch.unique(ids)), "sorted and unique"
            assert ids.max() <= r and ids.min() >= 0, "causal"
            assert ids[0] == 0 and ids[-1] == r, "sink and diagonal"
    for s in range(layout.num_seqs):
        probe_row = (layout.k_lens[s] - min(BS, layout.q_lens[s])) // BS
        nb = layout.num_key_blocks(s)
        for t in range(layout.first_tile[s], layout.first_tile[s + 1]):
            r = rows[t].item()
            for h in range(q.shape[1]):
                if r >= probe_row:
                    assert cnt[h, t] == r + 1, "the probe's tiles keep every causal block"
                elif cfg.max_blocks is not None and not sel.query_aware[s, h]:
                    assert cnt[h, t] <= 2 * cfg.max_blocks, "at most max_blocks verticals and offsets"
        # budgets of the lines themselves
        q_s, k_s = q[layout.q_range(s)], k[layout.k_range(s)]
        for h in range(q.shape[1]):
            keep_v, keep_s, qa = naive_lines(q_s[-min(BS, len(q_s)):, h], k_s[:, h // 2], cfg, 0.125)
            assert qa == bool(sel.query_aware[s, h])
            lo = min(cfg.min_blocks, nb)
            hi = lo if qa else min(cfg.max_blocks or nb, nb)
            for keep in (keep_v, keep_s):
                assert lo <= keep.sum() <= hi and keep[0], "budget, sink / diagonal first"


def test_vertical_slash_coverage_reaches_gamma():
    q, k, layout = batch()
    cfg = FlexPrefillConfig(gamma=0.9, tau=0.0, min_budget=None, sparse_block_size=BS, min_sparse_tokens=0)
    n_probe = BS  # 700 >= BS queries, so the probe is one full block
    for h in range(4):
        keep_v, keep_s, qa = naive_lines(q[700 - n_probe:700, h], k[:700, h // 2], cfg, 0.125)
        vertical, slash = probe_distribution_from_scores(q[700 - n_probe:700, h], k[:700, h // 2], 0.125)
        assert not qa
        assert vertical[keep_v].sum() >= 0.9 - 1e-5
        assert slash[keep_s].sum() >= 0.9 - 1e-5  # both indexed by block offset


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("ops", [torch_ops, triton_ops], ids=["torch-twins", "triton-kernels"])
def test_batched_estimator_matches_spec(cfg, ops):
    q, k, layout = batch()
    spec = naive_select_blocks(q, k, layout, cfg, 0.125)
    got = estimate_blocks(q, k, layout, cfg, 0.125, ops=ops())
    assert torch.equal(got.query_aware, spec.query_aware)
    assert torch.equal(got.block_cnt, spec.block_cnt)
    assert torch.equal(got.block_idx, spec.block_idx)


@pytest.mark.parametrize("ops", [torch_ops, triton_ops], ids=["torch-twins", "triton-kernels"])
def test_batched_estimator_reads_a_paged_cache(ops):
    # the CUDA backend's path: keys stay in shuffled pages, each sequence read at its rows
    # (the query-aware config: every kernel runs)
    q, k, layout = batch()
    cfg = next(c.values[0] for c in CONFIGS if c.id == "query-aware")
    key_cache, _, rows = paged_cache(k, k, layout.k_lens)
    spec = naive_select_blocks(q, k, layout, cfg, 0.125)
    got = estimate_blocks(q, key_cache, layout, cfg, 0.125, ops=ops(), k_rows=rows)
    assert torch.equal(got.query_aware, spec.query_aware)
    assert torch.equal(got.block_cnt, spec.block_cnt)
    assert torch.equal(got.block_idx, spec.block_idx)


def test_estimated_probe_rows_run_in_segments():
    # the CUDA path of attention.sparse_attention: the estimator keeps every causal block of
    # the probe's rows (dense_rows), so those tiles may run in segments with the same result
    from vllm_flexprefill.kernels.block_sparse_attn import block_sparse_attention

    q, k, layout = batch()
    v = torch.randn_like(k)
    cfg = next(c.values[0] for c in CONFIGS if c.id == "vertical-slash")
    sel = estimate_blocks(q, k, layout, cfg, 0.125, ops=torch_ops())
    rows = dense_rows(layout)
    assert rows == [20, 27, 1]
    for s, row0 in enumerate(rows):
        for t in range(layout.first_tile[s], layout.first_tile[s + 1]):
            row = layout.tile_row[t].item()
            if row >= row0:
                assert (sel.block_cnt[:, t] == row + 1).all()
    split = layout.tail_split(rows, seg_blocks=4)
    assert split.split_tiles.tolist() == [20, 21, 31, 32]  # the short third sequence stays whole
    args = (*layout.grid(), sel.block_idx,
            sel.block_cnt, BS, 0.125)
    whole = block_sparse_attention(q, k, v, *args)
    cut = block_sparse_attention(q, k, v, *args, out=torch.full_like(q, float("nan")), split=split)
    torch.testing.assert_close(cut.float(), whole.float(), atol=ATOL[torch.bfloat16], rtol=0)


def test_dense_sequences_keep_every_causal_block():
    q, k, _ = batch()
    layout = BatchLayout.build([700, 300, 90], [700, 900, 90], BS, "cpu", sparse=[False, True, False])
    cfg = FlexPrefillConfig(gamma=0.5, tau=0.0, min_budget=None, sparse_block_size=BS, min_sparse_tokens=0)
    sel = estimate_blocks(q, k, layout, cfg, 0.125, ops=torch_ops())
    density = sel.density(layout)
    assert (density[0] == 1).all() and (density[2] == 1).all()
    assert (density[1] < 1).all()
    assert not sel.query_aware[0].any()


@pytest.mark.parametrize("tau", [0.0, 0.8])
def test_selection_grows_with_gamma(tau):
    # a higher gamma keeps every block a lower one kept: the lines' coverage counts and the
    # query-aware threshold are monotone in gamma, and the pattern test does not depend on it
    q, k, layout = batch()
    chosen = []
    for gamma in (0.5, 0.8, 0.9, 0.95, 0.99):
        cfg = FlexPrefillConfig(gamma=gamma, tau=tau, min_budget=None, sparse_block_size=BS, min_sparse_tokens=0)
        sel = naive_select_blocks(q, k, layout, cfg, 0.125)
        idx = sel.padded(layout)
        mask = torch.zeros(*idx.shape[:2], layout.max_key_blocks + 1, dtype=torch.bool)
        mask.scatter_(-1, torch.where(idx >= 0, idx, layout.max_key_blocks).long(), True)
        chosen.append(mask[..., :-1])
    for smaller, larger in zip(chosen, chosen[1:]):
        assert (larger | ~smaller).all(), "a block kept at a lower gamma was dropped at a higher one"
    assert chosen[-1].sum() > chosen[0].sum()


def test_estimation_is_one_call_per_operation_for_a_whole_batch():
    # no loop over requests: each operation (one kernel launch on the GPU) serves every sequence
    import dataclasses

    q, k, layout = batch()
    assert layout.num_seqs == 3 and all(layout.sparse)
    cfg = next(c.values[0] for c in CONFIGS if c.id == "query-aware")
    calls = []
    twins = torch_ops()

    def counted(name):
        op = getattr(twins, name)
        return lambda *a, **kw: calls.append(name) or op(*a, **kw)

    ops = dataclasses.replace(twins, **{f.name: counted(f.name) for f in dataclasses.fields(twins)})
    estimate_blocks(q, k, layout, cfg, 0.125, ops=ops)
    assert sorted(calls) == sorted(f.name for f in dataclasses.fields(twins))


def test_layer_calls_of_a_step_share_buffers_and_leave_their_counters_at_zero():
    # the backend's layouts carry a workspace (attention.plan_cuda): every layer call of a step
    # writes the same buffers. Two calls on different inputs each give what the PyTorch twins
    # give, and the counters the kernels count on are zero after each (the last program
    # resets them), also where the previous call left its results in the buffers.
    from vllm_flexprefill.kernels.block_sparse_attn import block_sparse_attention
    from vllm_flexprefill.kernels.naive import naive_block_sparse_attention
    from vllm_flexprefill.layout.workspace import FRESH, buffers, reuse_buffers

    q_lens, k_lens = [130, 40], [200, 40]
    layout = BatchLayout.build(q_lens, k_lens, BS, "cpu")
    assert buffers(layout) is FRESH  # until the builder gives the layout a workspace
    ws = reuse_buffers(layout)
    assert buffers(layout) is ws and reuse_buffers(layout) is ws
    cfg = next(c.values[0] for c in CONFIGS if c.id == "query-aware")
    split = layout.tail_split(dense_rows(layout), seg_blocks=2)
    assert split.segments.shape[1] > split.split_tiles.shape[0]  # tiles cut in several segments
    seen = []
    for seed in (3, 4):
        q, k, v = planted_inputs(q_lens, k_lens, 4, 2, 32, dtype=torch.bfloat16, seed=seed)
        q, k = (q, k) if seed == 3 else (q.flip(1), k.flip(1))  # other heads, other choices
        want = estimate_blocks(q, k, layout, cfg, 0.125, ops=torch_ops())
        got = estimate_blocks(q, k, layout, cfg, 0.125, ops=triton_ops())
        assert torch.equal(got.block_idx, want.block_idx) and torch.equal(got.block_cnt, want.block_cnt)
        assert torch.equal(got.query_aware, want.query_aware)
        out = block_sparse_attention(q, k, v, *layout.grid(), got.block_idx, got.block_cnt, BS, 0.125, split=split,
                                     workspace=ws)
        ref = naive_block_sparse_attention(q, k, v, *layout.grid(), got.block_idx, got.block_cnt, layout.block_size, 0.125)
        torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[torch.bfloat16], rtol=0)
        counters = {key[0]: t for key, t in ws.tensors.items() if key[0] in ("pooled.done", "attend.seg_done")}
        assert set(counters) == {"pooled.done", "attend.seg_done"}
        assert all((t == 0).all() for t in counters.values()), counters
        seen.append((got.block_idx.data_ptr(), got.block_cnt.clone()))
    assert seen[0][0] == seen[1][0], "the second call wrote the first call's buffer"
    assert not torch.equal(seen[0][1], seen[1][1]), "the two calls chose the same blocks: no test of reuse"
