"""Concurrent requests of mixed lengths through the OpenAI-compatible server on a real model.

Starts ``python -m vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs) with a
real model (``--model``: SmolLM2-135M-Instruct or Qwen2.5-Coder-1.5B-Instruct) and
FLEX_PREFILL, and sends N concurrent completion requests whose prompts are RULER-style
needle prompts of mixed lengths (token ids), in ``--rounds`` rounds: the first round is the
first traffic after start-up (what a user sees first), the later ones warm. Every round sends
prompts of its own (the same lengths, other needles and haystacks): the server's prefix
cache, on by default, would answer a repeated round from the first round's keys and values,
and the round would time the cache instead of the prefill. Timing runs with
FlexPrefill's statistics off; a separate round through a second server with statistics on
(a device synchronisation per layer call) says which prompts ran sparse. Reported per round:
the time from the first request to the last answer, prompt tokens per second, median
latency; per length: latency, failures and answers found. With several ``--backends`` the
same requests go through a server of each in turn (e.g. FLASH_ATTN, vLLM's stock backend),
and the last lines compare the first rounds and the warm rounds apart. Servers stop as
Ctrl-C stops them. Exits non-zero when a request failed.

    python benchmarks/serve_load.py --requests 64 --lengths 1024 4096 16384 32768 \
        --backends FLEX_PREFILL FLASH_ATTN                                              # GPU
    python benchmarks/serve_load.py --requests 8 --lengths 512 2048 --settings '{"min_sparse_tokens": 0}'  # CPU
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

SERVED = "model"  # --served-model-name


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


def start_server(backend: str, model: str, max_len: int, settings: dict, folder: str, stats_file: str | None):
    """A server with ``backend`` (and FlexPrefill's statistics when ``stats_file``); returns
    (process, base url) once it answers, or exits with the end of its log."""
    import torch

    from vllm_flexprefill import stats

    gpu = torch.cuda.is_available()
    log_path = os.path.join(folder, f"{backend}{'-stats' if stats_file else ''}.log")
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
           SERVED, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_len),
           "--gpu-memory-utilization", "0.8" if gpu else "0.3", "--attention-backend", backend]
    if backend == "FLEX_PREFILL":
        cmd += ["--additional-config", json.dumps({"flexprefill": settings})]
    env = dict(os.environ)
    env.pop(stats.ENV, None)
    if stats_file:
        env[stats.ENV] = stats_file
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2):
                return proc, base
        except OSError:
            time.sleep(2)
    stop(proc)
    raise SystemExit(f"the {backend} server did not start:\n" + open(log_path).read()[-3000:])


def stop(proc) -> None:
    """Stops a server as Ctrl-C does (it shuts its engine down), then harder if it hangs."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def send_round(base: str, backend: str, samples: list) -> dict:
    """All samples at once; each request's latency, and the time to the last answer."""

    def one(sample):
        start = time.perf_counter()
        status, body = post(base + "/v1/completions", {"model": SERVED, "prompt": list(sample.token_ids),
                                                       "max_tokens": sample.max_new_tokens, "temperature": 0})
        seconds = time.perf_counter() - start
        text = body["choices"][0]["text"] if status == 200 else ""
        return {"backend": backend, "length": sample.length, "status": status, "seconds": seconds,
                "found": sample.score(text), "prompt_tokens": len(sample.token_ids), "error": body.get("error")}

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(samples)) as pool:
        results = list(pool.map(one, samples))
    return {"results": results, "makespan": time.perf_counter() - start}


def serve(backend: str, model: str, max_len: int, settings: dict, rounds: list[list], folder: str,
          with_stats: bool) -> dict:
    """One round per list of samples in ``rounds`` through one server with statistics off
    (the first round is the first traffic after start-up); then, for FLEX_PREFILL and
    ``with_stats``, the first round's samples again through a new server with statistics on
    (a device synchronisation per layer call: not timed), to see which prompts ran sparse."""
    proc, base = start_server(backend, model, max_len, settings, folder, None)
    try:
        print(f"{backend} server up ({model}); {len(rounds)} rounds of {len(rounds[0])} concurrent requests",
              flush=True)
        timed = [send_round(base, backend, samples) for samples in rounds]
    finally:
        stop(proc)
    stats_file = None
    if with_stats and backend == "FLEX_PREFILL":
        stats_file = os.path.join(folder, f"stats-{backend}.jsonl")
        proc, base = start_server(backend, model, max_len, settings, folder, stats_file)
        try:
            send_round(base, backend, rounds[0])
        finally:
            stop(proc)
    return {"rounds": timed, "stats": stats_file}


def round_line(label: str, run: dict) -> str:
    tokens = sum(r["prompt_tokens"] for r in run["results"] if r["status"] == 200)
    return (f"{label}: all answered in {run['makespan']:.2f} s, {tokens / run['makespan']:.0f} prompt tokens/s, "
            f"median latency {statistics.median(r['seconds'] for r in run['results']):.2f} s")


def report(backend: str, run: dict, lengths: list[int]) -> None:
    """The table of one backend's rounds (the first apart from the warm ones) and, from the
    statistics pass, which prompts ran sparse."""
    from vllm_flexprefill import stats

    first, *warm = run["rounds"]
    sparse_ends, summary = set(), None
    if run["stats"] is not None:
        records = stats.read(run["stats"])
        steps = [r for r in records if r["kind"] == "step"]
        sparse_ends = {r["all"] for step in steps for r in step["requests"] if r["route"] == "sparse"}
        summary = stats.summarize(records)
    print(f"{backend} (statistics off)")
    print("  " + round_line("first round", first))
    for i, r in enumerate(warm, 2):
        print("  " + round_line(f"round {i}", r))
    results = [r for rnd in warm or [first] for r in rnd["results"]]
    print(f"  {'length':>7} {'requests':>8} {'failed':>6} {'latency s (median, warm)':>24} {'found':>6} "
          f"{'ran sparse':>10}")
    for n in lengths:
        rs = [r for r in results if r["length"] == n]
        ok = [r for r in rs if r["status"] == 200]
        # the statistics pass replays the first round's prompts
        firsts = [r for r in first["results"] if r["length"] == n and r["status"] == 200]
        sparse = sum(r["prompt_tokens"] in sparse_ends for r in firsts) if summary is not None else "-"
        print(f"  {n:>7} {len(rs):>8} {len(rs) - len(ok):>6} "
              f"{statistics.median(r['seconds'] for r in rs):>24.2f} {sum(r['found'] for r in ok):>6.0f} "
              f"{sparse:>10}")
    if summary is not None:
        density = summary.density if summary.density is None else round(summary.density, 3)
        print(f"  FlexPrefill (statistics pass): {summary.sparse_tokens} prompt tokens planned sparse, "
              f"{summary.dense_tokens} dense; density of the sparse layer calls {density}")


def compare(first: str, other: str, runs: dict, lengths: list[int]) -> str:
    """How much faster ``first`` was than ``other``: the first round, the warm rounds (medians)."""
    a, b = runs[first]["rounds"], runs[other]["rounds"]
    parts = [f"first round {b[0]['makespan'] / a[0]['makespan']:.2f}x"]
    if len(a) > 1 and len(b) > 1:
        warm_a = statistics.median(r["makespan"] for r in a[1:])
        warm_b = statistics.median(r["makespan"] for r in b[1:])
        parts.append(f"warm rounds {warm_b / warm_a:.2f}x")
        lat = []
        for n in lengths:
            la = statistics.median(r["seconds"] for rnd in a[1:] for r in rnd["results"] if r["length"] == n)
            lb = statistics.median(r["seconds"] for rnd in b[1:] for r in rnd["results"] if r["length"] == n)
            lat.append(f"{n}: {lb / la:.2f}x")
        parts.append("warm median latency " + ", ".join(lat))
    return f"{first} against {other} (time to all answers, >1: {first} faster): " + "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--settings", default="{}", help="FlexPrefill settings as JSON")
    parser.add_argument("--backends", nargs="+", default=["FLEX_PREFILL"],
                        help="attention backends: one server each, the same requests (e.g. FLEX_PREFILL FLASH_ATTN)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the requests per server (the first apart)")
    parser.add_argument("--no-stats", action="store_true", help="skip FLEX_PREFILL's statistics pass")
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "qwen2.5-coder-1.5b"])
    parser.add_argument("--out", default=None, help="JSON file for every request")
    args = parser.parse_args()

    import checkpoints
    from ruler_tasks import Generator
    from transformers import AutoTokenizer

    spec = checkpoints.MODELS[args.model]
    yarn = max(args.lengths) > spec.native_context
    model = str(checkpoints.checkpoint(args.model, yarn=yarn))
    max_len = spec.native_context * (spec.yarn_factor if yarn else 1)
    gen = Generator(AutoTokenizer.from_pretrained(model))
    # prompts of its own for every round (a repeated prompt would be a prefix-cache hit)
    samples = [[gen.sample("niah_single_number", args.lengths[i % len(args.lengths)], r * args.requests + i, seed=21)
                for i in range(args.requests)] for r in range(args.rounds)]
    folder = tempfile.mkdtemp(prefix="serve-load-")
    runs = {b: serve(b, model, max_len, json.loads(args.settings), samples, folder, not args.no_stats)
            for b in args.backends}
    for backend, run in runs.items():
        report(backend, run, args.lengths)
    first, *others = args.backends
    for other in others:
        print(compare(first, other, runs, args.lengths))
    results = [dict(r, round=i) for run in runs.values() for i, rnd in enumerate(run["rounds"]) for r in rnd["results"]]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"argv": sys.argv[1:], "model": args.model,
                       "makespan": {b: [rnd["makespan"] for rnd in run["rounds"]] for b, run in runs.items()},
                       "results": results}, f, indent=1)
    failed = [r for r in results if r["status"] != 200]
    if failed:
        print(f"{len(failed)} requests failed, e.g. {failed[0]}")
        sys.exit(1)


if __name__ == "__main__":
    main()
