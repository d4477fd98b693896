"""The real pretrained model (SmolLM2-135M-Instruct, converted offline) in vLLM with FlexPrefill."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, vllm_env

pytestmark = pytest.mark.slow


def test_flexprefill_answers_a_2k_passkey_question_as_dense_does(tmp_path):
    # benchmarks/ruler.py converts the model on first use (cached), then runs each engine in its own process
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "ruler.py"), "--lengths", "2048", "--samples", "2",
           "--tasks", "niah_single_noise", "--engines", "dense", "flex-sparse", "--ttft-reps", "0",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=vllm_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "ruler.json").read_text())
    dense, flex = (result["engines"][name]["rows"][0] for name in ("dense", "flex-sparse"))
    assert dense["n"] == flex["n"] == 2
    assert dense["accuracy"] == 100.0, result["engines"]["dense"]["texts"]
    assert flex["accuracy"] == dense["accuracy"], result["engines"]["flex-sparse"]["texts"]
    # every prompt token ran FlexPrefill, and it skipped blocks
    assert flex["sparse_tokens"] > 0 and flex["dense_tokens"] == 0, flex
    assert flex["density"] < 1.0, flex
    # per-prompt scores, and the prompt-by-prompt comparison with dense printed after the table
    assert result["engines"]["flex-sparse"]["scores"] == {"2048": [1.0, 1.0]}, result["engines"]["flex-sparse"]
    assert "flex-sparse   2048: 0/0" in proc.stdout, proc.stdout[-2000:]
