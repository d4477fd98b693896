"""The cost model and the per-layer router: sparse where it pays, dense where a layer is diffuse."""

import itertools

import pytest
import torch

from vllm_flexprefill.backend.cost_routing import REMEASURE_STEPS, DensityMemory, Router, length_bucket
from vllm_flexprefill.backend.routing import plan_batch
from vllm_flexprefill.config import FlexPrefillConfig
from vllm_flexprefill.costs import CONSERVATIVE, CPU, RATES_ENV, CostModel, Rates, rates_for

# a GPU-like device: dense at 500 TFLOP/s, sparse at 350, estimation 0.1 ms + per block
FAST = Rates(dense_rate=500.0, sparse_rate=350.0, dense_fixed=0.01, estimate_fixed=0.1, estimate_per_block=1e-5)
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(4)]


def router(rates=FAST, layers=LAYERS, **settings):
    cfg = FlexPrefillConfig(**settings)
    cost = CostModel(rates, num_heads=32, head_dim=128, block_size=cfg.sparse_block_size)
    return Router(cfg, cost, DensityMemory(layers, "cpu"))


def test_cost_model_break_even_separates_pays():
    cost = CostModel(FAST, 32, 128, 128)
    for q, k in ((8192, 8192), (32768, 32768), (4096, 65536)):
        even = cost.break_even([q], [k])
        assert cost.pays([q], [k], even - 1e-3) and not cost.pays([q], [k], even + 1e-3)
    # longer prompts tolerate a higher density: the estimation's fixed cost weighs less
    assert cost.break_even([65536], [65536]) > cost.break_even([8192], [8192])


def test_rates_by_device_name():
    assert rates_for(None, 64) is CPU
    assert rates_for("Some Unknown GPU", 128) is CONSERVATIVE
    long = [1 << 20]
    assert not CostModel(CPU, 9, 64, 128).pays(long, long, 0.05), "the CPU path never pays by default"


def test_rates_from_the_environment_replace_the_fields_given(monkeypatch):
    monkeypatch.setenv(RATES_ENV, '{"estimate_fixed": 0.3, "sparse_rate": 400}')
    rates = rates_for("Some Unknown GPU", 128)
    assert (rates.estimate_fixed, rates.sparse_rate) == (0.3, 400.0)
    assert rates.dense_rate == CONSERVATIVE.dense_rate
    for bad in ('{"estimate_fixd": 0.3}', "0.3", '{"sparse_rate": 0}', '{"dense_fixed": -1}', "{oops"):
        monkeypatch.setenv(RATES_ENV, bad)
        with pytest.raises(ValueError, match=RATES_ENV):
            rates_for("Some Unknown GPU", 128)


def test_router_candidates_by_length():
    r = router()
    assert not r.candidate(1024, 1024)
    assert r.candidate(131072, 131072)
    # a short chunk of a long prompt: its estimation scans every key block for few queries
    assert not r.candidate(16, 131072)


def measure(r, layer, bucket, density, times=1):
    for _ in range(times):
        r.memory.counter(LAYERS[layer], bucket, 1000)[0] += round(1000 * density)
        r.memory.refresh()


def test_layers_measure_before_they_run_sparse_and_diffuse_ones_run_dense():
    r = router()
    q, k = [65536], [65536]
    bucket = length_bucket(k[0])
    first = r.route_layers(q, k)
    assert first.sparse == frozenset() and first.measure == frozenset(range(4)), "never measured: measure, no guess"
    # layer 2 measured diffuse, the others concentrated
    for layer, density in enumerate([0.1, 0.2, 0.98, 0.3]):
        measure(r, layer, bucket, density)
    route = r.route_layers(q, k)
    assert route.sparse == frozenset({0, 1, 3}) and route.measure == frozenset()
    # kept dense, layer 2 measures again (never running sparse meanwhile): first after its turn
    # (the four layers first measured together), then every REMEASURE_STEPS steps
    steps = next(n for n in range(1, 1000) if 2 in r.route_layers(q, k).measure)
    assert steps == REMEASURE_STEPS + 2 * REMEASURE_STEPS // 4
    steps = next(n for n in range(1, 1000) if 2 in r.route_layers(q, k).measure)
    assert steps == REMEASURE_STEPS + 1
    assert all(2 not in r.route_layers(q, k).sparse for _ in range(5))
    # a diffuse layer that becomes concentrated runs sparse once its measurements say so
    measure(r, 2, bucket, 0.05, times=3)
    assert 2 in r.route_layers(q, k).sparse


def test_steps_that_count_nothing_leave_the_memory_alone():
    # a prefill step in which no layer ran the estimation (every request dense) reads and
    # folds nothing: the memory's work is for the pairs that counted
    r = router()
    bucket = length_bucket(65536)
    measure(r, 1, bucket, 0.3)
    assert r.memory.density(1, bucket) == (pytest.approx(0.3), True)
    reads = []
    r.memory.counts.sum = lambda *args, **kwargs: reads.append(args)  # what a fold reads first
    for _ in range(3):
        r.memory.refresh()
    assert reads == [] and r.memory.density(1, bucket) == (pytest.approx(0.3), True)


def test_diffuse_layers_measure_again_in_turns():
    # every layer measured diffuse in the same step (all unknown at first): from then on they
    # remeasure in different steps, each once per REMEASURE_STEPS + 1 steps
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(30)]
    r = router(layers=layers)
    q, k = [65536], [65536]
    bucket = length_bucket(k[0])
    assert r.route_layers(q, k).measure == frozenset(range(30))
    for layer in layers:
        r.memory.counter(layer, bucket, 1000)[0] += 990
    r.memory.refresh()
    measured = [r.route_layers(q, k).measure for _ in range(3 * (REMEASURE_STEPS + 1))]
    assert max(len(m) for m in measured) <= 2, "at most two layers' estimations in one step"
    for layer in range(30):
        steps = [i for i, m in enumerate(measured) if layer in m]
        assert len(steps) >= 2 and {b - a for a, b in zip(steps, steps[1:])} == {REMEASURE_STEPS + 1}, (layer, steps)


def test_an_unmeasured_length_borrows_the_nearest_shorter_one():
    # a slower sparse kernel: break-even near 0.38
    r = router(rates=Rates(dense_rate=500.0, sparse_rate=200.0, dense_fixed=0.01, estimate_fixed=0.1,
                           estimate_per_block=1e-5))
    short, long = [32768], [131072]
    bucket = length_bucket(short[0])
    for layer, density in enumerate([0.1, 0.98, 0.5, 0.1]):
        measure(r, layer, bucket, density)
    even = r.cost.break_even(long, long)
    assert even < 0.5 < 1.5 * even < 0.98, "layer 2's borrowed estimate is near break-even, layer 1's far above"
    route = r.route_layers(long, long)
    # concentrated: sparse at once; diffuse by far: dense without measuring; near break-even: measure
    assert route.sparse == frozenset({0, 3}) and route.measure == frozenset({2})
    assert r.memory.density(0, length_bucket(131072)) == (pytest.approx(0.1), False)
    # a shorter length never borrows from a longer one
    assert r.route_layers([8192], [8192]).measure == frozenset(range(4))


def test_plan_runs_sparse_per_layer_and_dense_when_no_layer_pays():
    r = router()
    q_lens, seq_lens = [1, 65536], [900, 65536]
    qsl = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
    table = torch.arange(2 * 4096, dtype=torch.int32).view(2, 4096)
    bucket = length_bucket(65536)
    plan = plan_batch(qsl, torch.tensor(seq_lens), table, 16, r.config, decode_threshold=1, router=r)
    assert plan.requests == (1,), "the first long prompt is planned for measuring"
    assert [(plan.runs_sparse(name), plan.measures(name)) for name in LAYERS] == [(False, True)] * 4
    for layer, density in enumerate([0.1, 0.99, 0.1, 0.99]):
        measure(r, layer, bucket, density, times=2)
    plan = plan_batch(qsl, torch.tensor(seq_lens), table, 16, r.config, decode_threshold=1, router=r)
    assert [plan.runs_sparse(name) for name in LAYERS] == [True, False, True, False]
    assert not any(plan.measures(name) for name in LAYERS)
    # every layer measured diffuse: the whole batch runs dense, no plan
    for layer in (0, 2):
        measure(r, layer, bucket, 0.99, times=4)
    assert plan_batch(qsl, torch.tensor(seq_lens), table, 16, r.config, decode_threshold=1, router=r) is None
    # a short prompt: no layer pays, the whole batch runs dense
    short = torch.tensor([0, 1, 2049], dtype=torch.int32)
    assert plan_batch(short, torch.tensor([900, 2048]), table, 16, r.config, decode_threshold=1, router=r) is None


def test_fixed_thresholds_bypass_the_cost_model():
    cfg = FlexPrefillConfig(min_sparse_tokens=0, min_sparse_query_tokens=0)
    assert not cfg.cost_routing and FlexPrefillConfig().cost_routing
    qsl = torch.tensor([0, 2048], dtype=torch.int32)
    plan = plan_batch(qsl, torch.tensor([2048]), torch.zeros(1, 128, dtype=torch.int32), 16, cfg, decode_threshold=1)
    assert plan.requests == (0,) and plan.sparse_layers is None and plan.runs_sparse("any layer")


def test_start_up_says_when_flexprefill_can_never_run(caplog):
    import logging
    import types

    from vllm_flexprefill.backend.settings import make_router

    model = types.SimpleNamespace(get_num_attention_heads=lambda parallel: 9, get_num_kv_heads=lambda parallel: 3,
                                  get_head_size=lambda: 64,
                                  max_model_len=8192)
    vllm_config = types.SimpleNamespace(model_config=model, parallel_config=None)
    with caplog.at_level(logging.INFO, logger="vllm.flexprefill"):
        router = make_router(FlexPrefillConfig(), vllm_config, LAYERS, "cpu")
        assert make_router(FlexPrefillConfig(min_sparse_tokens=0), vllm_config, LAYERS, "cpu") is None
    assert router is not None
    text = caplog.text
    assert "will run no sparse prefill" in text and "max_model_len=8192" in text and "min_sparse_tokens" in text
    assert "fixed thresholds (min_sparse_tokens=0" in text
