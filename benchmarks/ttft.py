"""Time to first token and decode time in vLLM: FLASH_ATTN vs FLEX_PREFILL, same GPU, same run.

Llama-3.1-8B shapes (all 32 layers; --shape picks Qwen2-7B, GLM-4-9B or Yi-9B-200K shapes
instead) with random weights (load_format="dummy"), prompts of random token ids, batch 1,
prefix caching off, 8192-token chunks. ``--shape smollm2`` or ``--shape qwen2.5-coder-1.5b`` runs a real
pretrained model instead (``benchmarks/checkpoints.py``: native up to its context, its YaRN
variant above) on
RULER-style needle prompts, with chunked prefill as vLLM sets it. Each engine runs in its
own process; the first prompt warms it up (Triton compiles, the router measures densities).

    python benchmarks/ttft.py --lengths 8192 32768 65536 131072 --chunked on off --out bench-results
    python benchmarks/ttft.py --shape smollm2 --lengths 4096 8192 16384 32768 --engines FLASH_ATTN FLEX_PREFILL
    python benchmarks/ttft.py --shape qwen2-7b --lengths 32768 --engines FLASH_ATTN FLEX_10

Engines: "FLASH_ATTN"; "FLEX_PREFILL" (default settings); "FLEX_10" (FLEX_PREFILL with
tau = 0 and max_budget = N / 40 tokens, which keeps about 10 % of the causal blocks on
random-weight attention; one engine per length); "FLEX_FLOOR" (tau = 0, max_budget =
min_budget = 1024: every head keeps exactly the default floor, which is what the default
settings cost on attention concentrated enough to need no more); "FLEX_SPARSE" (default
settings with every prefill chunk sparse: ``min_sparse_tokens = min_sparse_query_tokens = 0``).
``NAME:triton`` or ``NAME:fa4`` runs engine NAME with that block-sparse kernel (``kernel`` in
the config; the default picks FlashAttention-4 where it runs).
``--rates NAME='{"estimate_fixed": 0.5}'`` adds an engine NAME: default settings with the
cost model's rates replaced as the JSON says (``VLLM_FLEXPREFILL_RATES``, costs.py), to try
a calibration side by side with the current one. ``--settings NAME='{"gamma": 0.9}'`` adds an
engine NAME: FLEX_PREFILL with those settings (``additional_config["flexprefill"]``).
``--packages NAME=DIR`` adds an engine NAME: FLEX_PREFILL default settings with the
vllm_flexprefill package found in DIR (a branch's copy of the checkout), so that a change
to the package is timed against the current one in the same run, engines alternating;
``ENGINE@NAME`` runs any engine above (``FLEX_10@SEG``) with that folder's package.

``--compilation eager`` (the default) runs without torch.compile and captures CUDA graphs
for decode only; ``vllm`` is vLLM's own default (torch.compile and CUDA graphs), what a
user gets. Prefill chunks longer than the captured sizes run outside CUDA graphs either way.

For the FlexPrefill engines one more prompt of each length runs with FlexPrefill's
statistics on: the density of its sparse layer calls and the share of prompt tokens
planned sparse are printed ("what ran") and kept in the JSON. For every engine one more
prompt of each length runs with the attention layers' forward and the attention metadata
builds timed on the host ("host"): the mean host time of a sparse, a measuring (dense, with
the estimation beside it) and a dense layer call, of FlashAttention's forward inside
FlexPrefill's layers ("flash_attn") and of a build, and of all layer calls against the
prompt's wall time, without a profiler's own cost. A layer call whose host time reaches
the GPU time of a whole layer leaves the GPU waiting.

``--first-round K`` numbers this call's rounds from K, so that rounds run in separate
calls (one machine call each, say) keep apart in the JSON; ``--table A.json B.json ...``
prints the table over the rows of saved runs, medians over all their rounds, and runs
nothing.

``--profile`` runs one more prompt of the longest length under ``torch.profiler`` and writes
``profile-<engine>-<N>.txt``: wall time, the time the GPU was busy, and the operations that
took it, to see where a layer call's time goes inside vLLM. For the FlexPrefill engines one
more prompt runs with its sparse layer calls and its metadata builds under cProfile
(``host-profile-<engine>-<N>.txt``: the functions they spent their host time in, by
cumulative time), to see what a sparse call's host time inside vLLM is made of.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import itertools
import json
import multiprocessing
import os
import pathlib
import pstats
import statistics
import sys
import tempfile
import time

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}
# the shapes of the published configs (max_position_embeddings is set from --lengths)
SHAPES = {
    "llama-3.1-8b": LLAMA_8B,
    "qwen2-7b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
        "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28,
        "vocab_size": 152064, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16"},
    "glm-4-9b": {
        "architectures": ["Glm4ForCausalLM"], "model_type": "glm4", "hidden_size": 4096, "intermediate_size": 13696,
        "num_attention_heads": 32, "num_key_value_heads": 2, "num_hidden_layers": 40, "head_dim": 128,
        "vocab_size": 151552, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "attention_bias": True, "hidden_act": "silu", "tie_word_embeddings": False, "eos_token_id": 151329,
        "pad_token_id": 151329, "torch_dtype": "bfloat16"},
    "yi-9b-200k": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
        "num_attention_heads": 32, "num_key_value_heads": 4, "num_hidden_layers": 48, "vocab_size": 64000,
        "rms_norm_eps": 1e-6, "rope_theta": 10000000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"},
}

# real pretrained models (benchmarks/checkpoints.py)
REAL_MODELS = ("smollm2", "qwen2.5-coder-1.5b")


def engine_run(spec: dict) -> dict:
    """engine_measure in this process; failures come back as text (vLLM's errors don't pickle)."""
    import traceback

    try:
        return engine_measure(spec)
    except Exception:
        return {"error": traceback.format_exc()}


def engine_measure(spec: dict) -> dict:
    """One engine: TTFT per length (median of reps), decode ms/token at decode_length."""
    # the engine core runs in this (pool worker) process, which may not start children
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if spec.get("package"):
        # another build of the package (a branch's patched copy) ahead of this one, before vLLM
        # loads its plugin; this process is the engine's alone
        sys.path.insert(0, spec["package"])
    if spec.get("rates"):
        os.environ["VLLM_FLEXPREFILL_RATES"] = json.dumps(spec["rates"])
    from vllm import LLM, SamplingParams

    real = spec.get("prompts") is not None
    kwargs = dict(model=spec["model"], load_format="auto" if real else "dummy", skip_tokenizer_init=True,
                  dtype="bfloat16", max_model_len=spec["max_model_len"], enable_prefix_caching=False, seed=0,
                  gpu_memory_utilization=0.9, enable_chunked_prefill=spec["chunked"], max_num_seqs=4)
    if spec["compilation"] == "eager":
        kwargs["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                        "cudagraph_capture_sizes": [1, 2, 4]}
    else:  # vLLM's own default (torch.compile, CUDA graphs), with few graph sizes to capture
        kwargs["compilation_config"] = {"cudagraph_capture_sizes": [1, 2, 4]}
    if not real or not spec["chunked"]:
        kwargs["max_num_batched_tokens"] = 8192 if spec["chunked"] else spec["max_model_len"]
    kwargs["attention_backend"] = "FLASH_ATTN" if spec["backend"] == "FLASH_ATTN" else "FLEX_PREFILL"
    if spec.get("flexprefill"):
        kwargs["additional_config"] = {"flexprefill": spec["flexprefill"]}
    llm = LLM(**kwargs)
    prompt = prompt_source(spec)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    # warm-up: a prompt long enough for the sparse path to run (a real model's variant has
    # prompts of its own lengths only)
    llm.generate([prompt(spec["lengths"][0] if real else min(spec["lengths"][-1], 32768))], one, use_tqdm=False)
    from ruler import package_folder

    # the folder holding the package the engine ran (None: FlexPrefill not loaded)
    out = {"ttft_ms": {}, "decode_ms_per_token": None, "package": package_folder()}
    for n in spec["lengths"]:
        times = []
        for _ in range(spec["reps"]):
            p = prompt(n)
            times.append(wall_ms(llm, p, one))
        out["ttft_ms"][n] = statistics.median(times)
    if spec.get("profile_dir") and spec["lengths"][-1] == max(spec["all_lengths"]):
        profile_prompt(llm, prompt(spec["lengths"][-1]), one, spec)
        if spec["backend"] != "FLASH_ATTN":
            try:
                host_profile(llm, prompt(spec["lengths"][-1]), one, spec)
            except Exception as e:  # a diagnostic: its failure leaves the timings standing
                print(f"host profile failed: {type(e).__name__}: {e}", flush=True)
    if spec["backend"] != "FLASH_ATTN":
        out["what_ran"] = [what_ran(llm, prompt(n), one) for n in spec["lengths"]]
    try:
        out["host"] = [host_time(llm, prompt(n), one, spec["backend"]) for n in spec["lengths"]]
    except Exception as e:  # a diagnostic: its failure leaves the timings above standing
        out["host_error"] = f"{type(e).__name__}: {e}"
    many = SamplingParams(temperature=0.0, max_tokens=DECODE_TOKENS, ignore_eos=True, detokenize=False)
    per_token = [decode_ms(llm, prompt(spec["decode_length"]), one, many, spec["max_model_len"]) for _ in range(3)]
    out["decode_ms_per_token"] = statistics.median(per_token)
    return out


DECODE_TOKENS = 257


def decode_ms(llm, prompt: dict, one, many, max_model_len: int) -> float:
    """Decode ms per token after the prompt: one generate of DECODE_TOKENS tokens less one of
    a single token on the same prompt, over the tokens generated after the first. vLLM stops a
    request at max_model_len, which a real model's longest prompts nearly fill (a 131030-token
    prompt leaves 42): the prompt's head is cut so that every token fits."""
    prompt = {"prompt_token_ids": prompt["prompt_token_ids"][-(max_model_len - DECODE_TOKENS):]}
    first = wall_ms(llm, prompt, one)
    ms, (done,) = timed_generate(llm, prompt, many)
    made = len(done.outputs[0].token_ids)
    if made < 2:
        raise RuntimeError(f"decode: the engine generated {made} token(s) where {DECODE_TOKENS} were asked")
    return (ms - first) / (made - 1)


def prompt_source(spec: dict):
    """prompt(n) -> {"prompt_token_ids": [...]}: for a real model's variant the next unseen
    prompt of length n from ``spec["prompts"]`` (KeyError for a length it has none of), else n
    random token ids (seeded)."""
    import torch

    if spec.get("prompts") is not None:
        real = {int(n): iter(p) for n, p in spec["prompts"].items()}
        return lambda n: {"prompt_token_ids": next(real[n])}
    g = torch.Generator().manual_seed(0)
    return lambda n: {"prompt_token_ids": torch.randint(1000, spec["vocab_size"] - 1000, (n,), generator=g).tolist()}


def timed_generate(llm, prompt: dict, params) -> tuple[float, list]:
    """Milliseconds of one ``generate`` of one prompt, the GPU drained before and after, and its outputs."""
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate([prompt], params, use_tqdm=False)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000, outputs


def wall_ms(llm, prompt: dict, params) -> float:
    """Milliseconds of one ``generate`` of one prompt, the GPU drained before and after."""
    return timed_generate(llm, prompt, params)[0]


def what_ran(llm, prompt: dict, params) -> dict:
    """One more prompt with FlexPrefill's statistics on (the engine runs in this process):
    the density of its sparse layer calls and the share of prompt tokens planned sparse."""
    from vllm_flexprefill import stats

    with tempfile.TemporaryDirectory() as tmp:
        os.environ[stats.ENV] = f"{tmp}/stats.jsonl"
        try:
            llm.generate([prompt], params, use_tqdm=False)
        finally:
            del os.environ[stats.ENV]
        records = stats.read(f"{tmp}/stats.jsonl")
    summary = stats.summarize(records)
    tokens = summary.sparse_tokens + summary.dense_tokens
    return {"N": len(prompt["prompt_token_ids"]), "density": summary.density,
            "sparse_share": summary.sparse_tokens / tokens if tokens else None, "layers": by_layer(records)}


def by_layer(records: list[dict]) -> dict[int, list]:
    """{layer index: [sparse calls, density over them]} from FlexPrefill's layer records (a
    layer that never ran sparse is absent: the router kept it dense), each layer's records
    summed up by ``stats.summarize``."""
    from vllm_flexprefill import stats

    groups: dict[int, list[dict]] = {}
    for r in records:
        if r.get("kind") == "layer":
            index = stats.layer_index(r["layer"])
            groups.setdefault(-1 if index is None else index, []).append(r)
    summaries = {i: stats.summarize(group) for i, group in sorted(groups.items())}
    return {i: [s.layer_calls, s.density] for i, s in summaries.items()}


def fmt_layers(layers: dict) -> str:
    """"index:density(calls)" per layer that ran sparse, e.g. "2:0.41(3) 5:0.22(3)"."""
    return " ".join(f"{i}:{'-' if d is None else f'{d:.2f}'}({calls})" for i, (calls, d) in layers.items())


def host_time(llm, prompt: dict, params, backend: str) -> dict:
    """One more prompt with the attention layers' forward and the attention metadata builds
    timed on the host (``timed``; the engine runs in this process): per kind (``call_kind``'s
    layer calls, FlashAttention's forward inside FlexPrefill's, builds) their number and mean
    host us, and the prompt's wall ms."""
    from vllm.v1.attention.backends import flash_attn

    fa = flash_attn.FlashAttentionImpl
    if backend == "FLASH_ATTN":
        impl, builder = fa, flash_attn.FlashAttentionMetadataBuilder
    else:
        from vllm_flexprefill.backend import cuda

        impl, builder = cuda.FlexPrefillImpl, cuda.FlexPrefillMetadataBuilder
    with contextlib.ExitStack() as stack:
        calls = stack.enter_context(timed(impl, "forward", lambda args: call_kind(args[0], args[5])))
        builds = stack.enter_context(timed(builder, "build", lambda args: "build"))
        # FlexPrefill's layers: FlashAttention's own forward inside them as well (what the dense
        # calls cost beyond it is FlexPrefill's)
        inner = stack.enter_context(timed(fa, "forward", lambda args: "flash_attn")) if impl is not fa else {}
        wall = wall_ms(llm, prompt, params)
    row = {"N": len(prompt["prompt_token_ids"]), "wall_ms": wall}
    for kind, spans in {**calls, **builds, **inner}.items():
        row[f"{kind}_calls"] = len(spans)
        row[f"{kind}_host_us"] = 1e6 * sum(spans) / len(spans) if spans else None
    row["attention_host_ms"] = 1000 * sum(sum(spans) for spans in calls.values())
    return row


def call_kind(layer, attn_metadata) -> str:
    """"sparse" where FlexPrefill's plan runs this layer sparse, "measure" where it runs dense
    and measures the density (the estimation beside FlashAttention), else "dense"."""
    plan = getattr(attn_metadata, "plan", None)
    if plan is None:
        return "dense"
    name = getattr(layer, "layer_name", "")
    return "sparse" if plan.runs_sparse(name) else "measure" if plan.measures(name) else "dense"


@contextlib.contextmanager
def wrapped(cls, name: str, around):
    """Within: method ``name`` of class ``cls`` replaced by ``around(original method)``;
    the original is back on exit."""
    original = getattr(cls, name)
    setattr(cls, name, around(original))
    try:
        yield
    finally:
        setattr(cls, name, original)


@contextlib.contextmanager
def timed(cls, name: str, kind):
    """Within: method ``name`` of class ``cls`` timed on the host per call (perf_counter
    around it; no synchronisation), the seconds kept per ``kind(positional args)``. Yields
    {kind: [seconds, ...]}."""
    times: dict[str, list[float]] = {}

    def around(original):
        def timed_call(self, *args, **kwargs):
            label = kind(args)
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                times.setdefault(label, []).append(time.perf_counter() - start)
        return timed_call

    with wrapped(cls, name, around):
        yield times


@contextlib.contextmanager
def profiled(cls, name: str, want, profiler: cProfile.Profile):
    """Within: the calls of method ``name`` of class ``cls`` for which ``want(positional args)``
    holds run under ``profiler`` (enabled for those calls only). Yields {"calls": count}."""
    seen = {"calls": 0}

    def around(original):
        def profiled_call(self, *args, **kwargs):
            if not want(args):
                return original(self, *args, **kwargs)
            seen["calls"] += 1
            profiler.enable()
            try:
                return original(self, *args, **kwargs)
            finally:
                profiler.disable()
        return profiled_call

    with wrapped(cls, name, around):
        yield seen


def host_profile(llm, prompt: dict, params, spec: dict, top: int = 40) -> str:
    """One prompt with FlexPrefill's sparse layer calls and its metadata builds under cProfile
    (the engine runs in this process); writes ``host-profile-<engine>-<N>.txt`` (functions by
    cumulative time) and returns its first line."""
    from vllm_flexprefill.backend import cuda

    profiler = cProfile.Profile()
    with profiled(cuda.FlexPrefillImpl, "forward", lambda args: call_kind(args[0], args[5]) == "sparse",
                  profiler) as calls, \
            profiled(cuda.FlexPrefillMetadataBuilder, "build", lambda args: True, profiler) as builds:
        wall = wall_ms(llm, prompt, params)
    return write_host_profile(profiler, calls["calls"], builds["calls"], wall, spec, len(prompt["prompt_token_ids"]),
                              top)


def write_host_profile(profiler: cProfile.Profile, calls: int, builds: int, wall: float, spec: dict, n: int,
                       top: int) -> str:
    """Writes ``host-profile-<engine>-<N>.txt``: a head line (the counts, and the host time in
    the profiled calls, which includes cProfile's own cost) and the ``top`` functions by
    cumulative time; returns the head line."""
    text = io.StringIO()
    profiler.create_stats()
    stats = pstats.Stats(profiler, stream=text) if profiler.stats else None
    total_ms = 1000 * stats.total_tt if stats else 0.0
    head = (f"{spec['backend']} {spec.get('flexprefill')} N={n}: wall {wall:.1f} ms under cProfile, "
            f"{calls} sparse layer calls and {builds} builds profiled, {total_ms:.1f} ms of host time in them")
    if stats:
        stats.sort_stats("cumulative").print_stats(top)
    path = pathlib.Path(spec["profile_dir"]) / f"host-profile-{spec['backend'].replace(':', '-')}-{n}.txt"
    path.write_text(head + "\n" + text.getvalue())
    print(head, flush=True)
    return head


def profile_prompt(llm, prompt: dict, params, spec: dict) -> None:
    """One prompt under torch.profiler (the engine runs in this process): a text summary."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = wall_ms(llm, prompt, params)
    events = prof.key_averages()
    # device time of the kernels and copies themselves (the events that ran on the GPU)
    busy = sum(e.self_device_time_total for e in events
               if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation) / 1000
    n = len(prompt["prompt_token_ids"])
    text = (f"{spec['backend']} {spec.get('flexprefill')} N={n}: wall {wall:.1f} ms (under the profiler), "
            f"GPU busy {busy:.1f} ms\n"
            + events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60))
    path = pathlib.Path(spec["profile_dir"]) / f"profile-{spec['backend'].replace(':', '-')}-{n}.txt"
    path.write_text(text)
    print(text.splitlines()[0], flush=True)


def engine_specs(engine: str, variants: list[dict], rates: dict, settings: dict, routing: dict,
                 packages: dict | None = None) -> list[dict]:
    """The runs of one engine name over the model variants: each variant with its FlexPrefill
    settings (None: FLASH_ATTN) and cost-model rates. NAME:triton / NAME:fa4 runs engine NAME
    with that block-sparse kernel; FLEX_10 runs one engine per length (its budget is the length's);
    a NAME of ``packages`` runs FLEX_PREFILL's default settings from that folder's package, and
    ENGINE@NAME runs ENGINE from it."""
    engine, _, folder = engine.partition("@")
    if folder:
        if not packages or folder not in packages:
            raise SystemExit(f"{engine}@{folder}: no --packages {folder}=DIR names the folder to run it from")
        return [dict(spec, package=packages[folder]) for spec in engine_specs(engine, variants, rates, settings,
                                                                              routing)]
    base, _, kernel = engine.partition(":")
    extra = {**routing, **({"kernel": kernel} if kernel else {})}
    specs = []
    for variant in variants:
        if base == "FLASH_ATTN" and not kernel:
            specs.append(dict(variant, flexprefill=None))
        elif base == "FLEX_10":
            specs += [dict(variant, flexprefill={"tau": 0.0, "min_budget": None, "max_budget": n // 40, **extra},
                           lengths=[n]) for n in variant["lengths"]]
        elif packages and base in packages:
            specs.append(dict(variant, flexprefill=extra or None, package=packages[base]))
        elif base == "FLEX_PREFILL" or base in rates:
            specs.append(dict(variant, flexprefill=extra or None, rates=rates.get(base)))
        elif base in settings:
            specs.append(dict(variant, flexprefill={**settings[base], **extra}))
        elif base == "FLEX_SPARSE":
            specs.append(dict(variant, flexprefill={"min_sparse_tokens": 0, "min_sparse_query_tokens": 0, **extra}))
        elif base == "FLEX_FLOOR":
            specs.append(dict(variant, flexprefill={"tau": 0.0, "max_budget": 1024, **extra}))
        else:
            raise SystemExit(f"unknown engine {engine!r}: FLASH_ATTN, FLEX_PREFILL, FLEX_SPARSE, FLEX_10, FLEX_FLOOR "
                             "(NAME:triton / NAME:fa4 for a kernel), or a NAME of --rates / --settings / --packages")
    return specs


def real_model_variants(name: str, lengths: list[int], reps: int) -> list[dict]:
    """A real model's runs (``checkpoints.MODELS[name]``): native up to its context, the YaRN
    variant above; needle prompts (one warm-up, reps timed, three for decode per length),
    each used once."""
    import checkpoints
    from ruler_tasks import Generator
    from transformers import AutoConfig, AutoTokenizer

    spec = checkpoints.MODELS[name]
    native = checkpoints.checkpoint(name)
    gen = Generator(AutoTokenizer.from_pretrained(native))
    vocab = AutoConfig.from_pretrained(native).vocab_size
    ctx, longest = spec.native_context, spec.native_context * spec.yarn_factor
    variants = []
    for model, max_len, ns in ((native, ctx, [n for n in lengths if n <= ctx]),
                               (checkpoints.checkpoint(name, yarn=True), longest, [n for n in lengths if n > ctx])):
        if ns:
            prompts = {n: [list(gen.sample("niah_single_number", n, i, seed=11).token_ids) for i in range(reps + 8)]
                       for n in ns}
            variants.append(dict(model=str(model), lengths=ns, max_model_len=max_len, prompts=prompts,
                                 vocab_size=vocab))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--engines", nargs="+", default=["FLASH_ATTN", "FLEX_PREFILL", "FLEX_10"])
    parser.add_argument("--chunked", nargs="+", default=["on"], choices=["on", "off"])
    parser.add_argument("--compilation", nargs="+", default=["eager"], choices=["eager", "vllm"],
                        help="eager: no torch.compile, CUDA graphs for decode only; vllm: vLLM's default")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every engine this many times, each in a fresh process, alternating engines; "
                             "the table shows the median and range over rounds (engine processes vary)")
    parser.add_argument("--first-round", type=int, default=0,
                        help="number this call's rounds from here (rounds of several calls, one JSON each)")
    parser.add_argument("--table", nargs="+", default=None, metavar="JSON",
                        help="print the table of these saved runs (ttft.json files) and run nothing")
    parser.add_argument("--decode-length", type=int, default=8192)
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES) + sorted(REAL_MODELS),
                        help="model shape (all layers, random weights), or a real model (checkpoints.py)")
    parser.add_argument("--min-sparse-tokens", type=int, default=None,
                        help="min_sparse_tokens for the FLEX engines (default: the config's)")
    parser.add_argument("--rates", nargs="+", default=[], metavar="NAME=JSON",
                        help="one more engine per NAME: default settings with these cost-model rates")
    parser.add_argument("--settings", nargs="+", default=[], metavar="NAME=JSON",
                        help="one more engine per NAME: FLEX_PREFILL with these settings")
    parser.add_argument("--packages", nargs="+", default=[], metavar="NAME=DIR",
                        help="one more engine per NAME: FLEX_PREFILL default settings with the vllm_flexprefill "
                             "in DIR (a branch's copy of the checkout, say)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-results"))
    parser.add_argument("--profile", action="store_true", help="profile one more prompt of the longest length")
    args = parser.parse_args()
    if args.table:
        runs = [row for path in args.table for row in json.loads(pathlib.Path(path).read_text())]
        print_table(runs, table_args(runs))
        return
    from ruler import named_json

    rates, settings = named_json(args.rates, "--rates"), named_json(args.settings, "--settings")
    packages = named_folders(args.packages)
    args.engines += [name for name in [*rates, *settings, *packages] if name not in args.engines]
    routing = {} if args.min_sparse_tokens is None else {"min_sparse_tokens": args.min_sparse_tokens}
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.shape in REAL_MODELS:
        variants = real_model_variants(args.shape, args.lengths, args.reps)
    else:
        model = pathlib.Path(tempfile.mkdtemp()) / f"{args.shape}-shapes"
        model.mkdir()
        max_len = max(args.lengths) + 256
        # room for a 128k-token prompt plus the generated tokens
        (model / "config.json").write_text(json.dumps({**SHAPES[args.shape], "max_position_embeddings": max_len}))
        variants = [dict(model=str(model), lengths=args.lengths, max_model_len=max_len, prompts=None,
                         vocab_size=SHAPES[args.shape]["vocab_size"])]

    runs = []
    rounds = range(args.first_round, args.first_round + args.rounds)
    for rnd, chunked, compilation in itertools.product(rounds, args.chunked, args.compilation):
        for engine in args.engines:
            for spec in engine_specs(engine, variants, rates, settings, routing, packages):
                spec.update(backend=engine, chunked=chunked == "on", compilation=compilation, reps=args.reps,
                            profile_dir=str(out_dir) if args.profile and rnd == 0 else None,
                            all_lengths=args.lengths,
                            decode_length=spec["lengths"][0] if spec["prompts"] else args.decode_length)
                with multiprocessing.get_context("spawn").Pool(1) as pool:
                    result = pool.apply(engine_run, (spec,))
                if "error" in result:
                    print(f"{engine} chunked={chunked} compilation={compilation} failed:\n{result['error'][-4000:]}",
                          flush=True)
                    continue
                if spec.get("package"):
                    print(f"package: {engine} ran {result['package']}", flush=True)
                for n, ms in result["ttft_ms"].items():
                    row = {"shape": args.shape, "engine": engine, "chunked": chunked, "compilation": compilation,
                           "round": rnd, "N": n, "ttft_ms": ms,
                           "decode_ms_per_token": result["decode_ms_per_token"], "package": result["package"]}
                    runs.append(row)
                    print(json.dumps(row), flush=True)
                if "host_error" in result:
                    print(f"host: {engine} failed: {result['host_error']}", flush=True)
                for host in result.get("host", []):
                    cells = [f"{host[k + '_calls']} {k} calls {host[k + '_host_us']:.0f} us"
                             for k in ("sparse", "measure", "dense", "flash_attn", "build") if host.get(k + "_calls")]
                    print(f"host: {engine} N={host['N']} {', '.join(cells)}; attention {host['attention_host_ms']:.1f} "
                          f"ms of wall {host['wall_ms']:.1f} ms", flush=True)
                    runs.append({"shape": args.shape, "engine": engine, "chunked": chunked,
                                 "compilation": compilation, "round": rnd, "host": host})
                for ran in result.get("what_ran", []):
                    density = "-" if ran["density"] is None else f"{ran['density']:.3f}"
                    share = "-" if ran["sparse_share"] is None else f"{100 * ran['sparse_share']:.0f} %"
                    if ran.get("layers") is not None:
                        print(f"by layer: {engine} N={ran['N']} {fmt_layers(ran['layers'])}", flush=True)
                    print(f"what ran: {engine} N={ran['N']} density {density} over sparse layer calls, "
                          f"{share} of prompt tokens planned sparse", flush=True)
                    runs.append({"shape": args.shape, "engine": engine, "chunked": chunked,
                                 "compilation": compilation, "round": rnd, "what_ran": ran})
    (out_dir / "ttft.json").write_text(json.dumps(runs, indent=1))
    print_table(runs, args)


def named_folders(pairs: list[str]) -> dict[str, str]:
    """``NAME=DIR`` pairs as {NAME: absolute DIR}; a DIR without a vllm_flexprefill package is
    refused with its name (the engine would quietly run this checkout's package instead)."""
    out = {}
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        path = pathlib.Path(folder).resolve()
        if not sep or not name:
            raise SystemExit(f"--packages takes NAME=DIR, got {pair!r}")
        if not (path / "vllm_flexprefill" / "__init__.py").is_file():
            raise SystemExit(f"--packages {name}: no vllm_flexprefill package in {path}")
        out[name] = str(path)
    return out


def table_args(runs: list[dict]) -> argparse.Namespace:
    """The engines, lengths, modes and round count that ``print_table`` needs, read from saved
    rows (in the order they first appear) instead of the command line."""
    timed = [r for r in runs if "ttft_ms" in r]
    if not timed:
        raise SystemExit("--table: no timed rows (ttft_ms) in these files")

    def seen(key):
        return list(dict.fromkeys(r[key] for r in timed))

    return argparse.Namespace(engines=seen("engine"), lengths=sorted(seen("N")), chunked=seen("chunked"),
                              compilation=seen("compilation"), rounds=len(seen("round")))


def print_table(runs: list[dict], args) -> None:
    """TTFT per engine (median over rounds; the range in brackets with several rounds), the
    speed-up against FLASH_ATTN, and decode ms/token."""
    print(f"{'chunked':>7} {'compile':>7} {'N':>7} " + " ".join(f"{e:>18}" for e in args.engines)
          + "  speed-up vs FLASH_ATTN, decode ms/token")
    for chunked, compilation in itertools.product(args.chunked, args.compilation):
        for n in args.lengths:
            cells = {}
            for e in args.engines:
                rows = [r for r in runs if "ttft_ms" in r and (r["chunked"], r["compilation"], r["N"], r["engine"])
                        == (chunked, compilation, n, e)]
                if rows:
                    cells[e] = {"ttft": statistics.median(r["ttft_ms"] for r in rows),
                                "lo": min(r["ttft_ms"] for r in rows), "hi": max(r["ttft_ms"] for r in rows),
                                "decode": statistics.median(r["decode_ms_per_token"] for r in rows)}

            def cell(e):
                if e not in cells:
                    return f"{'-':>18}"
                c = cells[e]
                spread = f" [{c['lo']:.0f}-{c['hi']:.0f}]" if args.rounds > 1 else ""
                return f"{c['ttft']:.1f}{spread}".rjust(18)

            line = f"{chunked:>7} {compilation:>7} {n:>7} " + " ".join(cell(e) for e in args.engines)
            if "FLASH_ATTN" in cells:
                line += "  " + " ".join(f"{e}={cells['FLASH_ATTN']['ttft'] / c['ttft']:.2f}x"
                                        for e, c in cells.items() if e != "FLASH_ATTN")
            line += "  " + " ".join(f"{e}={c['decode']:.2f}" for e, c in cells.items())
            print(line)


if __name__ == "__main__":
    main()
