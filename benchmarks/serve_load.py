"""Concurrent requests of mixed lengths through the OpenAI-compatible server on the real model.

Starts ``python -m vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs) with
SmolLM2-135M-Instruct and FLEX_PREFILL, sends N concurrent completion requests whose prompts
are RULER-style needle prompts of mixed lengths (token ids), and reports: how many failed,
latency per length, answers found, the time from the first request to the last answer, and
from FlexPrefill's statistics which prompt tokens ran sparse. With several ``--backends``
the same requests go through a server of each in turn (e.g. FLASH_ATTN, vLLM's stock
backend), and the last lines compare them. Exits non-zero when a request failed.

    python benchmarks/serve_load.py --requests 64 --lengths 1024 4096 16384 32768 \
        --backends FLEX_PREFILL FLASH_ATTN                                              # GPU
    python benchmarks/serve_load.py --requests 8 --lengths 512 2048 --settings '{"min_sparse_tokens": 0}'  # CPU
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 600) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read().decode())
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode()[:500]}
    except OSError as e:
        return 0, {"error": str(e)}


def serve(backend: str, model: str, max_len: int, settings: dict, samples: list, folder: str) -> dict:
    """One server with ``backend``, the samples sent at once; returns its results, the time
    from the first request to the last answer, and (FLEX_PREFILL) its statistics file."""
    import torch

    from vllm_flexprefill import stats

    gpu = torch.cuda.is_available()
    stats_file, log_path = os.path.join(folder, f"stats-{backend}.jsonl"), os.path.join(folder, f"{backend}.log")
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
           "smollm2", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_len),
           "--gpu-memory-utilization", "0.8" if gpu else "0.3", "--attention-backend", backend]
    if backend == "FLEX_PREFILL":
        cmd += ["--additional-config", json.dumps({"flexprefill": settings})]
    env = dict(os.environ, **{stats.ENV: stats_file})
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    break
            except OSError:
                time.sleep(2)
        if proc.poll() is not None or time.time() >= deadline:
            raise SystemExit(f"the {backend} server did not start:\n" + open(log_path).read()[-3000:])
        print(f"{backend} server up ({model}); {len(samples)} concurrent requests", flush=True)

        def one(sample):
            start = time.perf_counter()
            status, body = post(base + "/v1/completions", {"model": "smollm2", "prompt": list(sample.token_ids),
                                                           "max_tokens": sample.max_new_tokens, "temperature": 0})
            seconds = time.perf_counter() - start
            text = body["choices"][0]["text"] if status == 200 else ""
            return {"backend": backend, "length": sample.length, "status": status, "seconds": seconds,
                    "found": sample.score(text), "prompt_tokens": len(sample.token_ids), "error": body.get("error")}

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(samples)) as pool:
            results = list(pool.map(one, samples))
        makespan = time.perf_counter() - start
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"results": results, "makespan": makespan, "stats": stats_file if backend == "FLEX_PREFILL" else None}


def report(backend: str, run: dict, lengths: list[int]) -> None:
    """The table of one backend's run (and, for FLEX_PREFILL, which prompts ran sparse)."""
    from vllm_flexprefill import stats

    results = run["results"]
    sparse_ends, summary = set(), None
    if run["stats"] is not None:
        records = stats.read(run["stats"])
        steps = [r for r in records if r["kind"] == "step"]
        sparse_ends = {r["all"] for step in steps for r in step["requests"] if r["route"] == "sparse"}
        summary = stats.summarize(records)
    print(f"{backend}: all {len(results)} answered in {run['makespan']:.2f} s")
    print(f"{'length':>7} {'requests':>8} {'failed':>6} {'latency s (median)':>18} {'found':>6} {'ran sparse':>10}")
    for n in lengths:
        rs = [r for r in results if r["length"] == n]
        ok = [r for r in rs if r["status"] == 200]
        sparse = sum(r["prompt_tokens"] in sparse_ends for r in ok)
        print(f"{n:>7} {len(rs):>8} {len(rs) - len(ok):>6} "
              f"{statistics.median(r['seconds'] for r in rs):>18.2f} {sum(r['found'] for r in ok):>6.0f} "
              f"{sparse:>10}")
    if summary is not None:
        density = summary.density if summary.density is None else round(summary.density, 3)
        print(f"FlexPrefill: {summary.sparse_tokens} prompt tokens planned sparse, {summary.dense_tokens} dense; "
              f"density of the sparse layer calls {density}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--settings", default="{}", help="FlexPrefill settings as JSON")
    parser.add_argument("--backends", nargs="+", default=["FLEX_PREFILL"],
                        help="attention backends: one server each, the same requests (e.g. FLEX_PREFILL FLASH_ATTN)")
    parser.add_argument("--out", default=None, help="JSON file for every request")
    args = parser.parse_args()

    import checkpoints
    from ruler_tasks import Generator
    from transformers import AutoTokenizer

    yarn = max(args.lengths) > 8192
    model = str(checkpoints.checkpoint("smollm2", yarn=yarn))
    gen = Generator(AutoTokenizer.from_pretrained(model))
    samples = [gen.sample("niah_single_number", args.lengths[i % len(args.lengths)], i, seed=21)
               for i in range(args.requests)]
    folder = tempfile.mkdtemp(prefix="serve-load-")
    runs = {b: serve(b, model, 32768 if yarn else 8192, json.loads(args.settings), samples, folder)
            for b in args.backends}
    for backend, run in runs.items():
        report(backend, run, args.lengths)
    first, *others = args.backends
    for other in others:
        ratios = []
        for n in args.lengths:
            a = statistics.median(r["seconds"] for r in runs[first]["results"] if r["length"] == n)
            b = statistics.median(r["seconds"] for r in runs[other]["results"] if r["length"] == n)
            ratios.append(f"{n}: {b / a:.2f}x")
        whole = runs[other]["makespan"] / runs[first]["makespan"]
        print(f"{first} against {other} (>1: {first} faster): all answered {whole:.2f}x; "
              f"median latency {', '.join(ratios)}")
    results = [r for run in runs.values() for r in run["results"]]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"argv": sys.argv[1:], "makespan": {b: run["makespan"] for b, run in runs.items()},
                       "results": results}, f, indent=1)
    failed = [r for r in results if r["status"] != 200]
    if failed:
        print(f"{len(failed)} requests failed, e.g. {failed[0]}")
        sys.exit(1)


if __name__ == "__main__":
    main()
