"""The OpenAI-compatible server with the plugin: completions, chat, streaming, concurrency."""

import concurrent.futures
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import SPARSE, layer_calls, vllm_env
from synthetic import random_text

from vllm_flexprefill import stats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=300):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, resp.read().decode()


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    port = free_port()
    folder = tmp_path_factory.mktemp("serve")
    log_path, stats_file = folder / "server.log", folder / "stats.jsonl"
    log = open(log_path, "w")
    import torch

    on_gpu = torch.cuda.is_available()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model,
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float16" if on_gpu else "float32", "--max-model-len", "8192",
           "--max-num-batched-tokens", "1024", "--gpu-memory-utilization", "0.85" if on_gpu else "0.2",
           "--attention-backend", "FLEX_PREFILL", "--additional-config", json.dumps(SPARSE)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=vllm_env(**{stats.ENV: str(stats_file)}))
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            time.sleep(2)
    else:
        proc.kill()
    if proc.poll() is not None:
        pytest.fail("server did not start:\n" + log_path.read_text()[-3000:])
    yield base, stats_file
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_completions_and_chat(server):
    base, stats_file = server
    status, body = post(base + "/v1/completions", {"model": "tiny", "prompt": random_text(2000, 1),
                                                    "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert status == 200
    result = json.loads(body)
    assert result["usage"]["completion_tokens"] == 8
    assert result["usage"]["prompt_tokens"] >= 2000
    status, body = post(base + "/v1/chat/completions", {
        "model": "tiny", "max_tokens": 6, "temperature": 0,
        "messages": [{"role": "user", "content": random_text(1500, 2)}]})
    assert status == 200
    assert json.loads(body)["choices"][0]["message"]["content"] is not None
    assert layer_calls(stats.read(stats_file)), "FlexPrefill never ran in the server"


def test_streaming_chat(server):
    base, _ = server
    status, body = post(base + "/v1/chat/completions", {
        "model": "tiny", "max_tokens": 6, "temperature": 0, "stream": True,
        "messages": [{"role": "user", "content": random_text(1200, 3)}]})
    assert status == 200
    events = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 2


def test_32_concurrent_requests_of_mixed_lengths(server):
    base, stats_file = server
    before = len(stats.read(stats_file))
    lengths = [50, 400, 1500, 3000] * 8

    def one(i):
        return post(base + "/v1/completions", {"model": "tiny", "prompt": random_text(lengths[i], 10 + i),
                                               "max_tokens": 4, "temperature": 0, "ignore_eos": True})

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(one, range(32)))
    assert all(status == 200 for status, _ in results)
    usage = [json.loads(body)["usage"] for _, body in results]
    assert all(u["completion_tokens"] == 4 for u in usage)
    # the long prompts ran FlexPrefill: for each, a sparse chunk that ends at its last prompt token
    steps = [r for r in stats.read(stats_file)[before:] if r["kind"] == "step"]
    sparse_ends = {r["all"] for step in steps for r in step["requests"] if r["route"] == "sparse"}
    long = [u["prompt_tokens"] for u, n in zip(usage, lengths) if n == 3000]
    assert long and all(p in sparse_ends for p in long), (long, sorted(sparse_ends)[-10:])
