"""RULER-style accuracy of FlexPrefill against dense attention, on a real model, through vLLM.

A real model (``--model``, ``benchmarks/checkpoints.py``: SmolLM2-135M-Instruct, the default,
or Qwen2.5-Coder-1.5B-Instruct, both converted offline from registry packages) answers the
tasks of ``benchmarks/ruler_tasks.py`` with greedy decoding: prompts up to the model's
native context on the native model (8k for SmolLM2, 32k for Qwen), longer ones on its YaRN
x4 variant (to 32k, to 128k).
Every engine sees the same prompts. Per task and length: accuracy (the share of answers
found, as RULER scores) with counts, FlexPrefill's density (computed / causal key blocks
over its sparse layer calls) and the share of prompt tokens it ran sparse, and the time
to first token (median of single-prompt runs). Writes JSON, prints a table, and plots
accuracy against density.

    python benchmarks/ruler.py --lengths 4096 8192 16384 32768 --samples 100 --out bench-results
    python benchmarks/ruler.py --engines dense flex --engine 'g90={"gamma": 0.9}' --samples 20
    python benchmarks/ruler.py --report bench-results/ruler-a.json bench-results/ruler-b.json
    python benchmarks/ruler.py --lengths 32768 --samples 300 --tasks niah_single_noise niah_single_number \
        niah_multikey --engines dense flex --rates 'r2={"sparse_rate": 403.8}'
    python benchmarks/ruler.py --via transformers --lengths 16384 --samples 30 --engines dense flex-sparse
    python benchmarks/ruler.py --model qwen2.5-coder-1.5b --lengths 65536 131072 --samples 25 \
        --tasks niah_single_noise niah_single_number niah_single_word niah_single_uuid niah_multikey \
        niah_multivalue niah_multiquery vt

Engines: "dense" (vLLM's FLASH_ATTN on GPUs, its stock CPU backend on CPUs), "flex"
(FLEX_PREFILL, default settings), "flex-sparse" (FLEX_PREFILL with every prefill chunk
sparse: min_sparse_tokens = min_sparse_query_tokens = 0), and NAME=JSON for FLEX_PREFILL
with the given settings; ``--rates NAME=JSON``: default settings with the cost model's rates
replaced (``VLLM_FLEXPREFILL_RATES``). After the table, every engine is compared with the
first prompt by prompt: how many prompts only one of them answered in full, per task, and
the two-sided sign test of those counts (a difference of a few prompts in 100 is the
spread of a sample, not a change). Each engine runs in its own process; chunked prefill is left as
vLLM sets it; prefix caching is off so that repeated TTFT prompts are computed afresh;
eager mode (no torch.compile, no CUDA graphs) keeps engine starts short.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import pathlib
import statistics
import sys
import tempfile
import time

ENGINES = {"dense": None, "flex": {}, "flex-sparse": {"min_sparse_tokens": 0, "min_sparse_query_tokens": 0}}


def named_json(items: list[str], option: str) -> dict[str, dict]:
    """NAME=JSON items of a command-line option, as {NAME: parsed JSON}."""
    out = {}
    for item in items:
        name, _, text = item.partition("=")
        try:
            out[name] = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{option} {item!r}: what follows NAME= must be JSON ({e})") from None
    return out


def parse_engines(names: list[str], extra: list[str], rates: list[str] = ()) -> tuple[dict, dict]:
    """(engine name -> FLEX_PREFILL settings or None for dense, engine name -> cost-model rates)."""
    engines = {}
    for name in names:
        if name not in ENGINES:
            raise SystemExit(f"unknown engine {name!r}; built in: {', '.join(ENGINES)}, or --engine NAME=JSON")
        engines[name] = ENGINES[name]
    engines.update(named_json(extra, "--engine"))
    engine_rates = named_json(rates, "--rates")
    for name in engine_rates:
        engines.setdefault(name, {})
    return engines, engine_rates


def worker(spec: dict) -> dict:
    """One engine on one model variant, in this (spawned) process; errors come back as text."""
    import traceback

    try:
        return run_engine_hf(spec) if spec["via"] == "transformers" else run_engine(spec)
    except Exception:
        return {"error": traceback.format_exc()}


def run_engine(spec: dict) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core runs in this process
    stats_file = pathlib.Path(spec["stats_file"])
    os.environ["FLEXPREFILL_STATS"] = str(stats_file)
    if spec.get("rates"):
        os.environ["VLLM_FLEXPREFILL_RATES"] = json.dumps(spec["rates"])
    import torch
    from vllm import LLM, SamplingParams

    from vllm_flexprefill import stats

    gpu = torch.cuda.is_available()
    # eager mode: torch.compile's warm-up (about a minute per engine) buys little for this small model
    kwargs = dict(model=spec["model"], max_model_len=spec["max_model_len"], enable_prefix_caching=False, seed=0,
                  dtype="bfloat16" if gpu else "float32", gpu_memory_utilization=0.8 if gpu else 0.3,
                  enforce_eager=True)
    if spec["max_num_batched_tokens"]:
        kwargs["max_num_batched_tokens"] = spec["max_num_batched_tokens"]
    if spec["flexprefill"] is not None:
        kwargs.update(attention_backend="FLEX_PREFILL", additional_config={"flexprefill": spec["flexprefill"]})
    elif gpu:
        kwargs["attention_backend"] = "FLASH_ATTN"
    llm = LLM(**kwargs)
    results = {}
    for length, batch in spec["batches"].items():
        done = len(stats.read(stats_file))
        params = [SamplingParams(temperature=0.0, max_tokens=n) for n in batch["max_new_tokens"]]
        prompts = [{"prompt_token_ids": ids} for ids in batch["token_ids"]]
        print(f"[{spec['engine']}] {length} tokens: {len(prompts)} prompts", flush=True)
        outputs = llm.generate(prompts, params, use_tqdm=spec["progress"])
        summary = stats.summarize(stats.read(stats_file)[done:])
        # timed without statistics: recording them synchronises the device in every layer
        os.environ.pop("FLEXPREFILL_STATS", None)
        ttft = []
        one = SamplingParams(temperature=0.0, max_tokens=1)
        for ids in batch["ttft_token_ids"]:
            if gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            llm.generate([{"prompt_token_ids": ids}], one, use_tqdm=False)
            ttft.append((time.perf_counter() - start) * 1000)
        results[length] = {"texts": [o.outputs[0].text for o in outputs], "density": summary.density,
                           "sparse_tokens": summary.sparse_tokens, "dense_tokens": summary.dense_tokens,
                           "query_aware": summary.query_aware,
                           "ttft_ms": statistics.median(ttft) if ttft else None}
        os.environ["FLEXPREFILL_STATS"] = str(stats_file)
    return results


def run_engine_hf(spec: dict) -> dict:
    """One engine through transformers (the prompt's prefill in one piece, greedy decoding)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_flexprefill.hf.attention import patch_model

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16 if gpu else torch.float32,
                                                 attn_implementation="sdpa").to(device).eval()
    if spec["flexprefill"] is not None:
        patch_model(model, spec["flexprefill"])
    results = {}
    for length, batch in spec["batches"].items():
        print(f"[{spec['engine']}] {length} tokens: {len(batch['token_ids'])} prompts (transformers)", flush=True)
        texts = []
        with torch.no_grad():
            for ids, n in zip(batch["token_ids"], batch["max_new_tokens"]):
                out = model.generate(torch.tensor([ids], device=device), max_new_tokens=n, do_sample=False)
                texts.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
            ttft = []
            for ids in batch["ttft_token_ids"]:
                if gpu:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(torch.tensor([ids], device=device), logits_to_keep=1)
                if gpu:
                    torch.cuda.synchronize()
                ttft.append((time.perf_counter() - start) * 1000)
        results[length] = {"texts": texts, "density": None, "sparse_tokens": 0, "dense_tokens": 0,
                           "query_aware": None, "ttft_ms": statistics.median(ttft) if ttft else None}
    return results


def build_samples(tokenizer, tasks, lengths, samples, seed, ttft_reps):
    from ruler_tasks import Generator

    gen = Generator(tokenizer)
    out = {}
    for length in lengths:
        items = [gen.sample(task, length, i, seed) for task in tasks for i in range(samples)]
        # TTFT prompts: unseen single-needle prompts of the same length
        timing = [gen.sample("niah_single_number", length, samples + i, seed + 1) for i in range(ttft_reps)]
        out[length] = (items, timing)
    return out


def sample_scores(samples_by_length, texts: dict) -> dict[str, list[float]]:
    """Each answer's score (1.0: every expected string found), in prompt order, per length."""
    return {str(n): [s.score(t) for s, t in zip(samples_by_length[n][0], texts[str(n)])]
            for n in samples_by_length if str(n) in texts}


def score(samples_by_length, engine_results, prompt_scores: dict[str, list[float]]) -> list[dict]:
    """Accuracy rows per task and length from the per-prompt scores (``sample_scores``)."""
    rows = []
    for length, (items, _timing) in samples_by_length.items():
        res = engine_results[length]
        by_task: dict[str, list[float]] = {}
        for sample, value in zip(items, prompt_scores[str(length)]):
            by_task.setdefault(sample.task, []).append(value)
        for task, scores in by_task.items():
            rows.append({"task": task, "length": length, "n": len(scores), "accuracy": 100 * statistics.mean(scores),
                         "all_correct": sum(s == 1.0 for s in scores), "density": res["density"],
                         "sparse_tokens": res["sparse_tokens"], "dense_tokens": res["dense_tokens"],
                         "query_aware": res["query_aware"], "ttft_ms": res["ttft_ms"]})
    return rows


def fmt_density(row) -> str:
    if row["density"] is None:
        return "-"
    share = row["sparse_tokens"] / max(1, row["sparse_tokens"] + row["dense_tokens"])
    return f"{row['density']:.2f} ({100 * share:.0f}% sparse)"


def report(results: dict) -> str:
    """A table: accuracy (all-correct / n) per task and length, per engine; then the means."""
    engines = list(results["engines"])
    rows = {}
    for name in engines:
        for row in results["engines"][name]["rows"]:
            rows.setdefault((row["length"], row["task"]), {})[name] = row
    width = max(24, *(len(e) + 2 for e in engines))
    lines = [f"{'length':>6} {'task':<20}" + "".join(f"{e:>{width}}" for e in engines)]
    for length in sorted({k[0] for k in rows}):
        keys = [k for k in rows if k[0] == length]
        for key in sorted(keys, key=lambda k: k[1]):
            cells = []
            for e in engines:
                r = rows[key].get(e)
                cells.append(f"{r['accuracy']:6.1f} ({r['all_correct']}/{r['n']})" if r else "-")
            lines.append(f"{length:>6} {key[1]:<20}" + "".join(f"{c:>{width}}" for c in cells))
        means, dens, ttft = [], [], []
        for e in engines:
            rs = [rows[k][e] for k in keys if e in rows[k]]
            means.append(f"{statistics.mean(r['accuracy'] for r in rs):6.1f}" if rs else "-")
            dens.append(fmt_density(rs[0]) if rs else "-")
            ttft.append(f"{rs[0]['ttft_ms']:.1f} ms" if rs and rs[0]["ttft_ms"] is not None else "-")
        lines.append(f"{length:>6} {'MEAN':<20}" + "".join(f"{c:>{width}}" for c in means))
        lines.append(f"{length:>6} {'density':<20}" + "".join(f"{c:>{width}}" for c in dens))
        lines.append(f"{length:>6} {'TTFT (median)':<20}" + "".join(f"{c:>{width}}" for c in ttft))
    return "\n".join(lines)


def rescore(results: dict) -> None:
    """Per-prompt scores for engines whose file kept only the answers (written before scores were)."""
    import checkpoints
    from transformers import AutoTokenizer

    meta = results["meta"]
    lengths = sorted({int(n) for e in results["engines"].values() for n in e.get("texts", {})})
    name = meta.get("model", "smollm2")
    samples = build_samples(AutoTokenizer.from_pretrained(str(checkpoints.checkpoint(name))), meta["tasks"], lengths,
                            meta["samples"], meta["seed"], 0)
    for engine in results["engines"].values():
        if "scores" not in engine and "texts" in engine:
            engine["scores"] = sample_scores(samples, engine["texts"])


def sign_test(a: int, b: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven of a + b discordant
    prompts if neither engine were better (each way with probability 1/2)."""
    n = a + b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a, b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(results: dict) -> str:
    """Every engine against the first, prompt by prompt, from the per-prompt scores.

    Per length and task: prompts answered in full by the first engine only / by the other
    only (the prompts both or neither answered say nothing about the difference); then the
    totals and their sign test.
    """
    engines = [e for e in results["engines"] if "scores" in results["engines"][e]]
    if len(engines) < 2:
        return ""
    ref = engines[0]
    tasks = results["meta"]["tasks"]
    samples = results["meta"]["samples"]
    lines = [f"prompt by prompt against {ref}: answered in full by {ref} only / by the engine only"]
    for name in engines[1:]:
        for length, theirs in results["engines"][name]["scores"].items():
            ours = results["engines"][ref]["scores"].get(length)
            if ours is None or len(ours) != len(theirs):
                continue
            cells, total_a, total_b = [], 0, 0
            for i, task in enumerate(tasks):
                span = range(i * samples, (i + 1) * samples)
                a = sum(ours[j] == 1.0 and theirs[j] != 1.0 for j in span)
                b = sum(theirs[j] == 1.0 and ours[j] != 1.0 for j in span)
                total_a, total_b = total_a + a, total_b + b
                if a or b:
                    cells.append(f"{task} {a}/{b}")
            lines.append(f"{name:>16} {length:>6}: {total_a}/{total_b} (sign test p = "
                         f"{sign_test(total_a, total_b):.2f})" + (f"; {', '.join(cells)}" if cells else ""))
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> bool:
    """Mean accuracy against density, one point per engine and length (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, engine in results["engines"].items():
        points = {}
        for row in engine["rows"]:
            points.setdefault(row["length"], []).append(row)
        xs, ys, labels = [], [], []
        for length, rs in sorted(points.items()):
            xs.append(rs[0]["density"] if rs[0]["density"] is not None else 1.0)
            ys.append(statistics.mean(r["accuracy"] for r in rs))
            labels.append(f"{length // 1024}k")
        ax.plot(xs, ys, "o", label=name, alpha=0.8)
        for x, y, label in zip(xs, ys, labels):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("density of the sparse layer calls (computed / causal key blocks; dense = 1)")
    ax.set_ylabel("mean accuracy over tasks (%)")
    model = {"smollm2": "SmolLM2-135M-Instruct", "qwen2.5-coder-1.5b": "Qwen2.5-Coder-1.5B-Instruct"}.get(
        results["meta"].get("model", "smollm2"), results["meta"].get("model"))
    ax.set_title(results["meta"].get("title", f"RULER-style accuracy, {model}"))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "qwen2.5-coder-1.5b"],
                        help="the real model (benchmarks/checkpoints.py)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--samples", type=int, default=100, help="samples per task and length")
    parser.add_argument("--tasks", nargs="+", default=None, help="default: every task of ruler_tasks.py")
    parser.add_argument("--engines", nargs="*", default=["dense", "flex", "flex-sparse"],
                        help="built-in engines (none: only those given with --engine)")
    parser.add_argument("--engine", action="append", default=[], metavar="NAME=JSON",
                        help="FLEX_PREFILL with these settings, e.g. 'g90={\"gamma\": 0.9}'")
    parser.add_argument("--rates", action="append", default=[], metavar="NAME=JSON",
                        help="FLEX_PREFILL, default settings, these cost-model rates (VLLM_FLEXPREFILL_RATES)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ttft-reps", type=int, default=5)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: vLLM's")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--name", default="ruler", help="file name stem of the JSON and the plot")
    parser.add_argument("--report", nargs="+", default=None, help="merge result files and print their table")
    parser.add_argument("--via", choices=["vllm", "transformers"], default="vllm",
                        help="transformers: each prompt's prefill in one piece (FlexPrefill's attn_implementation), "
                             "a second check of the vLLM path; no density statistics")
    args = parser.parse_args()

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        merged = {"meta": {}, "engines": {}}
        for f in args.report:
            data = json.loads(pathlib.Path(f).read_text())
            merged["meta"] = merged["meta"] or data["meta"]
            merged["engines"].update(data["engines"])
        if any("scores" not in e and "texts" in e for e in merged["engines"].values()):
            rescore(merged)
        print(report(merged))
        print(paired(merged))
        if plot(merged, out / f"{args.name}.png"):
            print(f"plot: {out / f'{args.name}.png'}")
        return

    import checkpoints
    from ruler_tasks import TASKS
    from transformers import AutoTokenizer

    tasks = args.tasks or list(TASKS)
    engines, engine_rates = parse_engines(args.engines, args.engine, args.rates)
    spec = checkpoints.MODELS[args.model]
    ctx_len = spec.native_context
    native = str(checkpoints.checkpoint(args.model))
    yarn = str(checkpoints.checkpoint(args.model, yarn=True)) if max(args.lengths) > ctx_len else None
    tokenizer = AutoTokenizer.from_pretrained(native)
    samples = build_samples(tokenizer, tasks, args.lengths, args.samples, args.seed, args.ttft_reps)
    variants = [(native, ctx_len, [n for n in args.lengths if n <= ctx_len]),
                (yarn, spec.yarn_factor * ctx_len, [n for n in args.lengths if n > ctx_len])]
    results = {"meta": {"model": args.model, "lengths": args.lengths, "samples": args.samples, "tasks": tasks,
                        "seed": args.seed,
                        "via": args.via, "python": sys.version.split()[0], "argv": sys.argv[1:]},
               "engines": {}}
    ctx = multiprocessing.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="ruler-stats-")
    for name, config in engines.items():
        engine_results: dict[int, dict] = {}
        for model, max_len, lengths in variants:
            if not lengths:
                continue
            batches = {n: {"token_ids": [list(s.token_ids) for s in samples[n][0]],
                           "max_new_tokens": [s.max_new_tokens for s in samples[n][0]],
                           "ttft_token_ids": [list(s.token_ids) for s in samples[n][1]]} for n in lengths}
            spec = {"engine": name, "model": model, "max_model_len": max_len, "flexprefill": config,
                    "batches": batches, "stats_file": os.path.join(tmp, f"{name}-{max_len}.jsonl"),
                    "max_num_batched_tokens": args.max_num_batched_tokens, "progress": sys.stderr.isatty(),
                    "via": args.via, "rates": engine_rates.get(name)}
            start = time.perf_counter()
            with ctx.Pool(1) as pool:
                got = pool.apply(worker, (spec,))
            if "error" in got:
                raise SystemExit(f"engine {name} failed:\n{got['error']}")
            print(f"[{name}] {model}: {time.perf_counter() - start:.0f} s", flush=True)
            engine_results.update(got)
        texts = {str(n): r["texts"] for n, r in engine_results.items()}
        prompt_scores = sample_scores(samples, texts)
        results["engines"][name] = {"flexprefill": config, "rates": engine_rates.get(name), "rows": score(
            {n: samples[n] for n in args.lengths}, engine_results, prompt_scores),
            "texts": texts, "scores": prompt_scores}
        (out / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    print(report(results))
    print(paired(results))
    if plot(results, out / f"{args.name}.png"):
        print(f"plot: {out / f'{args.name}.png'}")
    print(f"results: {out / f'{args.name}.json'}")


if __name__ == "__main__":
    main()
