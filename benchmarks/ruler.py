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
with the given settings, or NAME=dense for dense attention under another name (the same
prompts answered again on another GPU, whose answers the file keeps apart); ``--rates
NAME=JSON``: default settings with the cost model's rates replaced
(``VLLM_FLEXPREFILL_RATES``). After the table, every engine is compared with the
first prompt by prompt: how many prompts only one of them answered in full, per task, and
the two-sided sign test of those counts (a difference of a few prompts in 100 is the
spread of a sample, not a change). Each engine runs in its own process; chunked prefill is left as
vLLM sets it; prefix caching is off so that repeated TTFT prompts are computed afresh;
eager mode (no torch.compile, no CUDA graphs) keeps engine starts short.

Answers are kept as they come, one task of one length of one engine at a time, in an answer
file (``--answers``, JSON lines; a temporary one without it). Run again with the same file,
a run cut short goes on where it stopped: cells already answered on the same prompts with
the same settings (defaults filled in, so a changed default is a new cell) are not run
again, and the results and the table cover every cell the file holds for the engines,
lengths and tasks asked for. Long campaigns (a 128k length is minutes of GPU per engine)
run in pieces that way:

    python benchmarks/ruler.py --model qwen2.5-coder-1.5b --lengths 32768 --engines dense flex \
        --answers .gpu-ruler/qwen.jsonl --out bench-results      # again until it says "done"

Each record carries the answers its prompts expect, so an answer file is scored anywhere,
without the model or the tokenizer (``--table``: the table and the prompt-by-prompt
comparison of the file's engines). The prompts themselves depend on the Python version (the
prose haystack is the documentation that ships with Python) and on the tokenizer: the
prompts' digest in each record keeps answers to other prompts apart, and the comparison
pairs only cells whose engines saw the same prompts.

    python benchmarks/ruler.py --table docs/results/ruler-qwen.jsonl --table-engines dense flex

Records also say where each answer's needle stands (``answer_starts``); ``--by-position
CHUNK`` adds to the table the answers found by only one engine, split by the prefill chunk
of CHUNK tokens their needle stands in (older records: the prompts are made again with the
tokenizer of the record's model, on this machine's prose).

    python benchmarks/ruler.py --table docs/results/ruler-qwen.jsonl --table-engines dense flex \
        --by-position 16384
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import pathlib
import statistics
import sys
import tempfile
import time

import ruler_tasks

ENGINES = {"dense": None, "flex": {}, "flex-sparse": {"min_sparse_tokens": 0, "min_sparse_query_tokens": 0}}


def named_json(items: list[str], option: str) -> dict[str, dict]:
    """NAME=JSON items of a command-line option, as {NAME: parsed JSON object} (also for ttft.py)."""
    out = {}
    for item in items:
        name, _, text = item.partition("=")
        try:
            out[name] = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{option} {item!r}: what follows NAME= must be JSON ({e})") from None
        if not isinstance(out[name], dict):
            raise SystemExit(f"{option} {item!r}: what follows NAME= must be a JSON object")
    return out


def parse_engines(names: list[str], extra: list[str], rates: list[str] = ()) -> tuple[dict, dict]:
    """(engine name -> FLEX_PREFILL settings or None for dense, engine name -> cost-model rates)."""
    engines = {}
    for name in names:
        if name not in ENGINES:
            raise SystemExit(f"unknown engine {name!r}; built in: {', '.join(ENGINES)}, or --engine NAME=JSON")
        engines[name] = ENGINES[name]
    dense = [item for item in extra if item.partition("=")[2] == "dense"]
    engines.update(named_json([item for item in extra if item not in dense], "--engine"))
    engines.update({item.partition("=")[0]: None for item in dense})
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
                  dtype="bfloat16" if gpu else "float32",
                  gpu_memory_utilization=spec.get("gpu_memory_utilization") or (0.8 if gpu else 0.3),
                  enforce_eager=True)
    if spec["max_num_batched_tokens"]:
        kwargs["max_num_batched_tokens"] = spec["max_num_batched_tokens"]
    if spec["flexprefill"] is not None:
        kwargs.update(attention_backend="FLEX_PREFILL", additional_config={"flexprefill": spec["flexprefill"]})
    elif gpu:
        kwargs["attention_backend"] = "FLASH_ATTN"
    llm = LLM(**kwargs)
    who = provenance()
    for cell in spec["cells"]:
        done = len(stats.read(stats_file))
        params = [SamplingParams(temperature=0.0, max_tokens=n) for n in cell["max_new_tokens"]]
        prompts = [{"prompt_token_ids": ids} for ids in cell["token_ids"]]
        print(f"[{spec['engine']}] {cell['length']} tokens, {cell['task']}: {len(prompts)} prompts", flush=True)
        outputs = llm.generate(prompts, params, use_tqdm=spec["progress"])
        summary = stats.summarize(stats.read(stats_file)[done:])
        append_answer(spec["answers"], {**cell["key"], "expected": cell["expected"],
                                        "answer_starts": cell["answer_starts"], **who,
                                        "texts": [o.outputs[0].text for o in outputs],
                                        "density": summary.density, "sparse_tokens": summary.sparse_tokens,
                                        "dense_tokens": summary.dense_tokens, "query_aware": summary.query_aware})
    # timed without statistics: recording them synchronises the device in every layer
    os.environ.pop("FLEXPREFILL_STATS", None)
    one = SamplingParams(temperature=0.0, max_tokens=1)
    time_prompts(spec, lambda ids: llm.generate([{"prompt_token_ids": ids}], one, use_tqdm=False), gpu)
    return {}


def provenance() -> dict:
    """Who answered, kept with the answers: the device, and the folder holding the package that
    ran (None: FlexPrefill not loaded)."""
    import torch

    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "package": package_folder()}


def package_folder() -> str | None:
    """The folder holding the vllm_flexprefill this process imported (None: none yet)."""
    package = sys.modules.get("vllm_flexprefill")
    return os.path.dirname(os.path.dirname(package.__file__)) if package else None


def time_prompts(spec: dict, run, gpu: bool) -> None:
    """Per timing item of ``spec["ttft"]``: the median ms of ``run(token ids)`` over its prompts
    (the device drained before and after each), appended to the answer file."""
    import torch

    for item in spec["ttft"]:
        ttft = []
        for ids in item["token_ids"]:
            if gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            run(ids)
            if gpu:
                torch.cuda.synchronize()
            ttft.append((time.perf_counter() - start) * 1000)
        append_answer(spec["answers"], {**item["key"], "ttft_ms": statistics.median(ttft) if ttft else None})


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
    who = provenance()
    with torch.no_grad():
        for cell in spec["cells"]:
            print(f"[{spec['engine']}] {cell['length']} tokens, {cell['task']}: {len(cell['token_ids'])} prompts "
                  "(transformers)", flush=True)
            texts = []
            for ids, n in zip(cell["token_ids"], cell["max_new_tokens"]):
                out = model.generate(torch.tensor([ids], device=device), max_new_tokens=n, do_sample=False)
                texts.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
            append_answer(spec["answers"], {**cell["key"], "expected": cell["expected"],
                                            "answer_starts": cell["answer_starts"], "texts": texts, **who,
                                            "density": None, "sparse_tokens": 0,
                                            "dense_tokens": 0, "query_aware": None})
        time_prompts(spec, lambda ids: model(torch.tensor([ids], device=device), logits_to_keep=1), gpu)
    return {}


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


# the fields that name an answer file's record: who answered (engine, its settings as given and
# with the defaults filled in, rates, vllm or transformers, the model), what (length, task, a
# digest of the prompts) or, for a timing record, the digest of the timed prompts
KEY_FIELDS = ("engine", "settings", "config", "rates", "via", "model", "length", "task", "prompts", "ttft")


def resolved_settings(settings: dict | None) -> dict | None:
    """Every FlexPrefill setting an engine runs with, as the package on the path fills in what
    ``settings`` leaves out (None for dense)."""
    if settings is None:
        return None
    from vllm_flexprefill.config import FlexPrefillConfig

    return FlexPrefillConfig.from_dict(settings).to_dict()


def key_of(record: dict) -> str:
    return json.dumps({k: record.get(k) for k in KEY_FIELDS}, sort_keys=True)


def digest(token_ids) -> str:
    """SHA-256 of a list of prompts' token ids (the same prompts give the same digest)."""
    h = hashlib.sha256()
    for ids in token_ids:
        h.update(",".join(map(str, ids)).encode() + b";")
    return h.hexdigest()[:16]


def append_answer(path: str | pathlib.Path, record: dict) -> None:
    """Adds one record to the answer file, on disk before it returns (a run stopped later keeps
    it); a line that a stopped writer left unfinished is closed first and then skipped on reading."""
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(json.dumps(record).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def read_answers(path: str | pathlib.Path) -> dict[str, dict]:
    """The answer file's records by ``key_of`` (the last one of a key wins); {} without a file."""
    path = pathlib.Path(path)
    out: dict[str, dict] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # cut short by a stopped run
        out[key_of(record)] = record
    return out


def cell_keys(who: dict, samples_by_length: dict, tasks: list[str], lengths: list[int]):
    """Per length: the key of each task's answers and of the timing prompts (None without any)."""
    out = {}
    for n in lengths:
        items, timing = samples_by_length[n]
        cells = {task: {**who, "length": n, "task": task,
                        "prompts": digest(s.token_ids for s in items if s.task == task)} for task in tasks}
        out[n] = (cells, {**who, "length": n, "ttft": digest(s.token_ids for s in timing)} if timing else None)
    return out


def assemble(who: dict, answers: dict[str, dict], samples_by_length: dict, tasks: list[str],
             lengths: list[int]) -> dict:
    """One engine's results from the answer file: rows per (task, length) answered, and the
    answers and per-prompt scores of each length whose every task was answered (prompt
    order: task-major, as ``build_samples`` makes them)."""
    rows, texts, scores = [], {}, {}
    for n, (cells, timing) in cell_keys(who, samples_by_length, tasks, lengths).items():
        items = samples_by_length[n][0]
        timed = answers.get(key_of(timing)) if timing else None
        length_texts, length_scores = [], []
        for task, key in cells.items():
            record = answers.get(key_of(key))
            if record is None:
                length_texts = None
                continue
            values = [s.score(t) for s, t in zip((s for s in items if s.task == task), record["texts"])]
            rows.append(cell_row(task, n, values, record, timed["ttft_ms"] if timed else None))
            if length_texts is not None:
                length_texts += record["texts"]
                length_scores += values
        if length_texts is not None:
            texts[str(n)], scores[str(n)] = length_texts, length_scores
    return {"rows": rows, "texts": texts, "scores": scores}


def engine_labels(cells: list[dict]) -> dict[str, str]:
    """The table's column of each answer record (by ``key_of``): its engine's name, and where
    one name answered under several settings (a default that changed between runs), the
    settings that tell them apart: "flex[gamma=0.9]" beside "flex[gamma=0.95]"."""
    seen: dict[str, dict[str, dict]] = {}
    for r in cells:
        seen.setdefault(r["engine"], {})[json.dumps(r.get("config"), sort_keys=True)] = r.get("config") or {}
    # per engine, the settings whose values differ between its runs (none for most engines)
    differ = {engine: sorted(k for k in set().union(*configs.values())
                             if len({json.dumps(c.get(k)) for c in configs.values()}) > 1)
              for engine, configs in seen.items()}
    labels = {}
    for r in cells:
        keys, mine = differ[r["engine"]], r.get("config") or {}
        labels[key_of(r)] = r["engine"] + (f"[{','.join(f'{k}={mine.get(k)}' for k in keys)}]" if keys else "")
    return labels


def columns_of(cells: list[dict], engines: list[str] | None) -> tuple[list[str], dict]:
    """The table's columns (``engine_labels``) that ``engines`` pick, in that order (None: every
    one, in the records' order; a plain name picks each of its columns), and each record by
    (column, length, task): the last record of a cell wins."""
    labels = engine_labels(cells)
    columns = list(dict.fromkeys(labels[key_of(r)] for r in cells))
    names = [c for e in engines for c in columns if c == e or c.startswith(e + "[")] if engines else columns
    return names, {(labels[key_of(r)], r["length"], r["task"]): r for r in cells}


def results_from_answers(records: list[dict], engines: list[str] | None = None) -> dict:
    """Results (as ``assemble`` gives them, for ``report`` and ``paired``) from answer records
    alone, scored with the answers each record expects: no model, tokenizer or prompts.

    engines: which engines, in this order (the first is the reference of ``paired``); None:
    every engine, in the file's order. An engine that ran under several settings has a column
    for each (``engine_labels``); its plain name picks them all. Each other engine's
    per-prompt scores, and the reference's beside them (``ref_scores``), cover the tasks both
    answered at a length on the same prompts (digest) and as many of them: the cells the
    comparison may pair.
    """
    cells = [r for r in records if "texts" in r]
    missing = [r for r in cells if "expected" not in r]
    if missing:
        raise SystemExit(f"{len(missing)} records carry no expected answers (written before records did, e.g. "
                         f"{missing[0]['engine']} {missing[0]['length']} {missing[0]['task']}): score them with "
                         "the run's own report")
    names, by = columns_of(cells, engines)
    results = {"meta": {"tasks": [], "samples": None, "pairs": {}}, "engines": {}}
    for name in names:
        rows = []
        for (engine, length, task), r in by.items():
            if engine != name:
                continue
            values = [ruler_tasks.score(a, t) for a, t in zip(r["expected"], r["texts"])]
            rows.append({**cell_row(task, length, values, r), "scores": values, "prompts": r["prompts"]})
        results["engines"][name] = {"rows": rows, "scores": {}}
    # per engine and length, the cells it and the reference answered on the same prompts
    ref = names[0]
    for name in names[1:]:
        engine = results["engines"][name]
        engine["ref_scores"], pairs = {}, results["meta"]["pairs"].setdefault(name, {})
        for length in sorted({r["length"] for r in cells}):
            theirs, ours = ({row["task"]: row for row in results["engines"][e]["rows"] if row["length"] == length}
                            for e in (name, ref))
            shared = sorted(t for t in theirs if t in ours and theirs[t]["prompts"] == ours[t]["prompts"]
                            and theirs[t]["n"] == ours[t]["n"])
            if not shared:
                continue
            samples = theirs[shared[0]]["n"]
            tasks = [t for t in shared if theirs[t]["n"] == samples]
            pairs[str(length)] = (tasks, samples)
            engine["scores"][str(length)] = [v for t in tasks for v in theirs[t]["scores"]]
            engine["ref_scores"][str(length)] = [v for t in tasks for v in ours[t]["scores"]]
    return results


def cell_row(task: str, length: int, values: list[float], record: dict, ttft_ms: float | None = None) -> dict:
    """The table row of one cell: its prompts' scores summed up, and its record's sparse-path counts."""
    return {"task": task, "length": length, "n": len(values), "accuracy": 100 * statistics.mean(values),
            "all_correct": sum(v == 1.0 for v in values), "density": record.get("density"),
            "sparse_tokens": record.get("sparse_tokens", 0), "dense_tokens": record.get("dense_tokens", 0),
            "query_aware": record.get("query_aware"), "ttft_ms": ttft_ms}


def mean_density(rows: list[dict]) -> float | None:
    """Density over the rows' sparse layer calls, each row's weighted by its sparse tokens
    (None where none ran sparse)."""
    sparse = sum(r["sparse_tokens"] for r in rows if r["density"] is not None)
    if not sparse:
        return None
    return sum(r["density"] * r["sparse_tokens"] for r in rows if r["density"] is not None) / sparse


def fmt_density(rows: list[dict]) -> str:
    """``mean_density`` and the share of the rows' prompt tokens planned sparse."""
    density = mean_density(rows)
    if density is None:
        return "-"
    share = sum(r["sparse_tokens"] for r in rows) / max(1, sum(r["sparse_tokens"] + r["dense_tokens"] for r in rows))
    return f"{density:.2f} ({100 * share:.0f}% sparse)"


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
            dens.append(fmt_density(rs) if rs else "-")
            ttft.append(f"{rs[0]['ttft_ms']:.1f} ms" if rs and rs[0]["ttft_ms"] is not None else "-")
        lines.append(f"{length:>6} {'MEAN':<20}" + "".join(f"{c:>{width}}" for c in means))
        lines.append(f"{length:>6} {'density':<20}" + "".join(f"{c:>{width}}" for c in dens))
        lines.append(f"{length:>6} {'TTFT (median)':<20}" + "".join(f"{c:>{width}}" for c in ttft))
    return "\n".join(lines)


def in_own_process(spec: dict) -> dict:
    """``worker(spec)`` in a spawned process (an engine's GPU memory goes with it)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(worker, (spec,))


def run_engine_cells(name: str, config: dict | None, rates: dict | None, variants, samples_by_length: dict,
                     tasks: list[str], lengths: list[int], answers: pathlib.Path, options: dict,
                     run=in_own_process) -> dict:
    """One engine: runs the cells (task, length) and timings the answer file lacks, one
    process per model variant (``run(spec)``; the worker appends each cell as it finishes),
    then returns the engine's results from the file (``assemble``).

    variants: (model folder, max_model_len, its lengths) per model variant.
    options: model (the name), via, max_num_batched_tokens, stats_dir, gpu_memory_utilization
    (optional; None: 0.8 on a GPU).
    """
    who = {"engine": name, "settings": config, "config": resolved_settings(config),
           "rates": rates, "via": options["via"], "model": options["model"]}
    answers.parent.mkdir(parents=True, exist_ok=True)
    for model, max_len, variant_lengths in variants:
        mine = [n for n in variant_lengths if n in lengths]
        if not mine:
            continue
        have = read_answers(answers)
        cells, ttft = [], []
        for n, (keys, timing) in cell_keys(who, samples_by_length, tasks, mine).items():
            for task, key in keys.items():
                if key_of(key) not in have:
                    items = [s for s in samples_by_length[n][0] if s.task == task]
                    cells.append({"key": key, "length": n, "task": task,
                                  "token_ids": [list(s.token_ids) for s in items],
                                  "max_new_tokens": [s.max_new_tokens for s in items],
                                  "expected": [list(s.answers) for s in items],
                                  "answer_starts": [list(s.answer_starts) for s in items]})
            if timing and key_of(timing) not in have:
                ttft.append({"key": timing, "token_ids": [list(s.token_ids) for s in samples_by_length[n][1]]})
        if not cells and not ttft:
            print(f"[{name}] {model}: answered already ({answers})", flush=True)
            continue
        spec = {"engine": name, "model": model, "max_model_len": max_len, "flexprefill": config,
                "cells": cells, "ttft": ttft, "answers": str(answers),
                "stats_file": os.path.join(options["stats_dir"], f"{name}-{max_len}.jsonl"),
                "max_num_batched_tokens": options["max_num_batched_tokens"], "progress": sys.stderr.isatty(),
                "via": options["via"], "rates": rates,
                "gpu_memory_utilization": options.get("gpu_memory_utilization")}
        start = time.perf_counter()
        got = run(spec)
        if "error" in got:
            raise SystemExit(f"engine {name} failed (its answers so far are in {answers}):\n{got['error']}")
        print(f"[{name}] {model}: {len(cells)} cells, {time.perf_counter() - start:.0f} s", flush=True)
    return {"flexprefill": config, "rates": rates, **assemble(who, read_answers(answers), samples_by_length, tasks,
                                                              lengths)}


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
    lines = [f"prompt by prompt against {ref}: answered in full by {ref} only / by the engine only"]
    for name in engines[1:]:
        for length, theirs in results["engines"][name]["scores"].items():
            # the reference's scores on the same prompts, and the tasks and prompts per task
            # behind them: one set for the whole run, or (answer files) per engine and length
            ours = results["engines"][name].get("ref_scores", results["engines"][ref]["scores"]).get(length)
            if ours is None or len(ours) != len(theirs):
                continue
            tasks, samples = results["meta"].get("pairs", {}).get(name, {}).get(
                length, (results["meta"]["tasks"], results["meta"]["samples"]))
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


def prompt_positions(seed: int):
    """``by_position``'s positions for records without their own: each prompt made again with
    the tokenizer of the record's model on this machine. The prose comes from this Python's
    documentation, so on another Python the needles stand a few tokens from where the
    answering GPU had them (the answers are the same: a prompt expecting others is left out)."""
    import checkpoints
    from ruler_tasks import Generator
    from transformers import AutoTokenizer

    made = {}

    def positions(model, task, length, index, expected):
        if model not in made:  # a tokenizer and its haystack only where a record needs them
            made[model] = Generator(AutoTokenizer.from_pretrained(str(checkpoints.checkpoint(model))))
        sample = made[model].sample(task, length, index, seed)
        if not sample.needle_spans:  # cwe: the answers are words of the prose, in no needle
            return [None] * len(expected)
        return list(sample.answer_starts) if list(sample.answers) == list(expected) else None

    return positions


def by_position(records: list[dict], engines: list[str] | None, positions, chunk: int) -> str:
    """Answers (expected strings) found by only one of the first engine and each other engine,
    by the chunk of ``chunk`` tokens where the needle holding the answer stands: chunked
    prefill's chunks (the default settings run the first dense; the last holds the question).

    Where the needles stand comes from the reference's record (``answer_starts``, in records
    written since they carry it), or for older records from positions(model, task, length,
    index, expected): the needles' first tokens of one prompt's answers as made again with the
    record's model, or None where that prompt expects other answers than the record (then the
    prompt is left out and counted).
    """
    cells = [r for r in records if "texts" in r and "expected" in r]
    names, by = columns_of(cells, engines)
    ref = names[0]
    lines = [(f"answers found by {ref} only / by the engine only, by the chunk of {chunk} tokens where "
              f"the needle stands (first | second | ...)")]

    def split(c):  # [[lost, won] per chunk] -> "lost/won | lost/won | ..."
        return " | ".join(f"{lost}/{won}" for lost, won in c)

    for name in names[1:]:
        for length in sorted({r["length"] for r in cells}):
            counts, unmatched, chunks = {}, 0, -(-length // chunk)
            for task in dict.fromkeys(r["task"] for r in cells):
                ours, theirs = by.get((ref, length, task)), by.get((name, length, task))
                if not ours or not theirs or ours["prompts"] != theirs["prompts"]:
                    continue
                kept = ours.get("answer_starts")
                for i, (expected, a_text, b_text) in enumerate(zip(ours["expected"], ours["texts"], theirs["texts"])):
                    starts = kept[i] if kept else positions(ours["model"], task, length, i, expected)
                    if starts is None:
                        unmatched += 1
                        continue
                    for answer, start in zip(expected, starts):
                        if start is None:
                            continue
                        # found: as the task scores it, one answer at a time
                        a, b = (ruler_tasks.score([answer], text) == 1.0 for text in (a_text, b_text))
                        if a != b:
                            c = counts.setdefault(task, [[0, 0] for _ in range(chunks)])
                            c[min(start // chunk, chunks - 1)][0 if a else 1] += 1
            if not counts and not unmatched:
                continue
            total = [[sum(c[i][k] for c in counts.values()) for k in (0, 1)] for i in range(chunks)]
            per_task = ", ".join(f"{t} {split(c)}" for t, c in counts.items())
            lines.append(f"{name:>16} {length:>6}: {split(total)}"
                         + (f"; {per_task}" if per_task else "")
                         + (f"; {unmatched} prompts left out (other answers here)" if unmatched else ""))
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
            density = mean_density(rs)
            xs.append(1.0 if density is None else density)
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


def arguments() -> argparse.ArgumentParser:
    """The command line (also read by the test that checks the GPU queue's lines)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "qwen2.5-coder-1.5b"],
                        help="the real model (benchmarks/checkpoints.py)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--samples", type=int, default=100, help="samples per task and length")
    parser.add_argument("--tasks", nargs="+", default=None, help="default: every task of ruler_tasks.py")
    parser.add_argument("--engines", nargs="*", default=["dense", "flex", "flex-sparse"],
                        help="built-in engines (none: only those given with --engine)")
    parser.add_argument("--engine", action="append", default=[], metavar="NAME=JSON",
                        help="FLEX_PREFILL with these settings, e.g. 'g90={\"gamma\": 0.9}'; NAME=dense: "
                             "dense attention under this name")
    parser.add_argument("--rates", action="append", default=[], metavar="NAME=JSON",
                        help="FLEX_PREFILL, default settings, these cost-model rates (VLLM_FLEXPREFILL_RATES)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ttft-reps", type=int, default=5)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: vLLM's")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="the engine's share of GPU memory (default 0.8): less leaves room for other work")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--name", default="ruler", help="file name stem of the JSON and the plot")
    parser.add_argument("--answers", default=None, metavar="FILE",
                        help="answer file (JSON lines) kept across runs: cells it holds are not run again")
    parser.add_argument("--report", nargs="+", default=None, help="merge result files and print their table")
    parser.add_argument("--table", nargs="+", default=None, metavar="FILE",
                        help="the table and prompt-by-prompt comparison of answer files (no model needed)")
    parser.add_argument("--table-engines", nargs="+", default=None,
                        help="with --table: these engines, in this order (the first is the reference)")
    parser.add_argument("--by-position", type=int, default=None, metavar="CHUNK",
                        help="with --table: the answers found by only one engine, by the prefill chunk of CHUNK "
                             "tokens their needle stands in; for records without needle positions the prompts are "
                             "made again with the tokenizer of each record's model, from this machine's Python "
                             "documentation")
    parser.add_argument("--via", choices=["vllm", "transformers"], default="vllm",
                        help="transformers: each prompt's prefill in one piece (FlexPrefill's attn_implementation), "
                             "a second check of the vLLM path; no density statistics")
    return parser


def main() -> None:
    args = arguments().parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.table:
        records = [r for f in args.table for r in read_answers(f).values()]
        results = results_from_answers(records, args.table_engines)
        print(report(results))
        print(paired(results))
        if args.by_position:
            print(by_position(records, args.table_engines, prompt_positions(args.seed), args.by_position))
        return
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
                        "seed": args.seed, "answers": args.answers,
                        "via": args.via, "python": sys.version.split()[0], "argv": sys.argv[1:]},
               "engines": {}}
    tmp = tempfile.mkdtemp(prefix="ruler-stats-")
    answers = pathlib.Path(args.answers) if args.answers else pathlib.Path(tmp) / "answers.jsonl"
    options = {"model": args.model, "via": args.via, "max_num_batched_tokens": args.max_num_batched_tokens,
               "stats_dir": tmp, "gpu_memory_utilization": args.gpu_memory_utilization}
    for name, config in engines.items():
        results["engines"][name] = run_engine_cells(name, config, engine_rates.get(name), variants, samples, tasks,
                                                    args.lengths, answers, options)
        (out / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    print(report(results))
    print(paired(results))
    if plot(results, out / f"{args.name}.png"):
        print(f"plot: {out / f'{args.name}.png'}")
    print(f"results: {out / f'{args.name}.json'}")
    wanted = len(engines) * len(args.lengths) * len(tasks)
    answered = sum(len(e["rows"]) for e in results["engines"].values())
    print(f"done: {answered} of {wanted} cells answered" if answered == wanted else
          f"{answered} of {wanted} cells answered: run again with --answers {answers}")


if __name__ == "__main__":
    main()
