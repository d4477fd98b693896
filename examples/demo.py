"""FlexPrefill in vLLM, end to end, with nothing to download.

Writes a tiny random Llama-style model, then answers one long prompt twice in vLLM: with
vLLM's stock attention backend and with FLEX_PREFILL. Prints both answers, the density
FlexPrefill chose per layer, and the time of each run.

    python examples/demo.py                                   # tiny model, CPU or GPU
    python examples/demo.py --model /path/to/Llama-3.1-8B-Instruct --prompt-words 60000   # a real model (GPU)
    python examples/demo.py --model /path/to/config-dir --load-format dummy               # real shapes, random weights

On the CPU, FlexPrefill runs its plain-PyTorch path, so it is slower than the stock
kernel there; the speed-up is a GPU matter (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import re
import tempfile
import time


class DensityLog(logging.Handler):
    """Collects FlexPrefill's per-layer density debug lines."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.densities: list[float] = []

    def emit(self, record):
        found = re.search(r"density ([0-9.]+)", record.getMessage())
        if found:
            self.densities.append(float(found.group(1)))


def run(backend: str, args: dict, prompt: str) -> dict:
    """One engine in this (spawned) process: generate, time it, collect densities."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import LLM, SamplingParams

    kwargs = dict(model=args["model"], max_model_len=args["max_model_len"], enforce_eager=True,
                  load_format=args["load_format"], distributed_executor_backend="uni",
                  gpu_memory_utilization=0.85 if torch.cuda.is_available() else 0.2,
                  dtype="bfloat16" if torch.cuda.is_available() else "float32")
    if backend != "stock":
        kwargs.update(attention_backend=backend, additional_config={"flexprefill": args["flexprefill"]})
    llm = LLM(**kwargs)
    # after the engine starts: vLLM reconfigures its loggers while starting
    handler = DensityLog()
    flex_logger = logging.getLogger("vllm.flexprefill")
    flex_logger.addHandler(handler)
    flex_logger.setLevel(logging.DEBUG)
    params = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"])
    llm.generate([prompt[:200]], params)  # warm-up
    handler.densities.clear()
    start = time.perf_counter()
    out = llm.generate([prompt], params)[0]
    seconds = time.perf_counter() - start
    return {"answer": out.outputs[0].text, "prompt_tokens": len(out.prompt_token_ids), "seconds": seconds,
            "densities": handler.densities}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model folder; default: a tiny random model written now")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--prompt-words", type=int, default=3000)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--gamma", type=float, default=0.95)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--min-budget", type=int, default=None,
                        help="tokens; default 1024 for real models, 256 for the tiny one")
    args = parser.parse_args()

    from vllm_flexprefill.testing import make_tiny_model, random_text

    tiny = args.model is None
    model = args.model or make_tiny_model(os.path.join(tempfile.mkdtemp(), "tiny-llama"), local_attention=True)
    words = random_text(args.prompt_words, seed=7).split()
    words.insert(len(words) // 3, "the secret key is omega")
    prompt = "<s> " + " ".join(words) + " question what is the secret key answer"
    flexprefill = {"gamma": args.gamma, "tau": args.tau,
                   "min_budget": args.min_budget or (256 if tiny else 1024)}
    if tiny:
        # a few thousand tokens are below the default dense threshold; show the sparse path anyway
        flexprefill.update(min_sparse_tokens=0, min_sparse_query_tokens=0, sparse_block_size=64)
    settings = {"model": model, "load_format": args.load_format, "max_tokens": args.max_tokens,
                "max_model_len": args.max_model_len or (8192 if tiny else 131072), "flexprefill": flexprefill}
    ctx = multiprocessing.get_context("spawn")
    results = {}
    for backend in ("stock", "FLEX_PREFILL"):
        with ctx.Pool(1) as pool:
            results[backend] = pool.apply(run, (backend, settings, prompt))

    print()
    print(f"model: {model}{' (tiny, random weights with a sink token and local attention)' if tiny else ''}")
    print(f"prompt: {results['stock']['prompt_tokens']} tokens; FlexPrefill settings: {flexprefill}")
    for backend, r in results.items():
        print(f"  {backend:>12}: {r['seconds'] * 1000:8.1f} ms  answer: {r['answer']!r}")
    dens = results["FLEX_PREFILL"]["densities"]
    if dens:
        print(f"FlexPrefill density per layer call: {[round(x, 3) for x in dens]}, mean {sum(dens) / len(dens):.3f}, "
              f"min {min(dens):.3f}, max {max(dens):.3f} ({len(dens)} calls)")
    else:
        print("FlexPrefill ran no sparse prefill (prompt below min_sparse_tokens)")
    print(f"time ratio stock / FlexPrefill: {results['stock']['seconds'] / results['FLEX_PREFILL']['seconds']:.2f}x")
    import torch

    if not torch.cuda.is_available():
        print("(CPU: FlexPrefill runs its plain-PyTorch reference path here, slower than the CPU kernel; "
              "its speed-up is on GPUs, docs/benchmarks.md)")


if __name__ == "__main__":
    main()
