"""The cost model and the per-layer router: sparse where it pays, dense where a layer is diffuse."""

import itertools

import pytest
import torch

from vllm_flexprefill.backend.cost_routing import PRIOR_DENSITY, DensityMemory, Router, length_bucket
from vllm_flexprefill.backend.routing import plan_batch
from vllm_flexprefill.config import FlexPrefillConfig
from vllm_flexprefill.costs import CONSERVATIVE, CPU, CostModel, Rates, rates_for

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


def test_router_candidates_by_length():
    r = router()
    assert not r.candidate(1024, 1024)
    assert r.candidate(131072, 131072)
    # a short chunk of a long prompt: its estimation scans every key block for few queries
    assert not r.candidate(16, 131072)


def test_diffuse_layers_run_dense_and_get_measured_again():
    r = router()
    q, k = [65536], [65536]
    bucket = length_bucket(k[0])
    assert r.sparse_layers(q, k) == frozenset(range(4)), "never measured: every layer tries sparse"
    # layer 2 measured diffuse, the others sparse
    for layer, density in enumerate([0.1, 0.2, 0.98, 0.3]):
        r.memory.record(LAYERS[layer], bucket, torch.tensor(density))
    r.memory.refresh()
    for _ in range(3):  # a few more measurements pull the estimate towards them
        r.memory.record(LAYERS[2], bucket, torch.tensor(0.98))
        r.memory.refresh()
    assert r.sparse_layers(q, k) == frozenset({0, 1, 3})
    # running dense, layer 2 drifts back towards the prior until it is tried again
    steps = next(n for n in range(1, 1000) if 2 in r.sparse_layers(q, k))
    assert 10 < steps < 200
    assert r.memory.density(2, bucket) == pytest.approx(r.cost.break_even(q, k), abs=0.02)
    assert r.memory.density(0, length_bucket(8192)) == PRIOR_DENSITY, "other lengths keep their own estimate"


def test_plan_runs_sparse_per_layer_and_dense_when_no_layer_pays():
    r = router()
    q_lens, seq_lens = [1, 65536], [900, 65536]
    qsl = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
    table = torch.arange(2 * 4096, dtype=torch.int32).view(2, 4096)
    bucket = length_bucket(65536)
    for layer in (1, 3):
        for _ in range(4):
            r.memory.record(LAYERS[layer], bucket, torch.tensor(0.99))
            r.memory.refresh()
    plan = plan_batch(qsl, torch.tensor(seq_lens), table, 16, r.config, decode_threshold=1, router=r)
    assert plan.requests == (1,)
    assert [plan.runs_sparse(name) for name in LAYERS] == [True, False, True, False]
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

    model = types.SimpleNamespace(get_num_attention_heads=lambda parallel: 9, get_head_size=lambda: 64,
                                  max_model_len=8192)
    vllm_config = types.SimpleNamespace(model_config=model, parallel_config=None)
    with caplog.at_level(logging.INFO, logger="vllm.flexprefill"):
        router = make_router(FlexPrefillConfig(), vllm_config, LAYERS, "cpu")
        assert make_router(FlexPrefillConfig(min_sparse_tokens=0), vllm_config, LAYERS, "cpu") is None
    assert router is not None
    text = caplog.text
    assert "will run no sparse prefill" in text and "max_model_len=8192" in text and "min_sparse_tokens" in text
    assert "fixed thresholds (min_sparse_tokens=0" in text
