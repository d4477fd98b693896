"""Kernel benchmark and cost-model calibration: one attention layer call, causal, bf16, batch 1.

(Not named kernels.py: benchmarks/ is on the path of every benchmark, and transformers imports
any module named ``kernels`` it finds there, taking it for the Hugging Face package.)

For each shape and length N, in one process on one GPU:
  - vLLM's FlashAttention-3 varlen kernel and cuDNN SDPA (K/V expanded to the query heads);
  - our block-sparse kernel at 100 / 50 / 25 / 10 % block density (random lists with sink
    and diagonal), its rate relative to FA3, and per computed block relative to its own
    dense rate (eta); at 100 and 50 % also on a paged cache read in place (the backend's
    path, whose rate the cost model takes);
  - where it runs (Hopper, vLLM's FlashAttention-4 importable), the same lists through FA4's
    block-sparse forward (``kernel="fa4"``: contiguous keys, as a fresh prompt reads them), at
    50 % also with the keys first copied out of the paged cache (a later chunk), and that
    copy alone;
  - the estimation alone, per layer call, for a fresh prompt of N tokens, for an 8k chunk
    at the end of N keys, and for four prompts of N / 4 tokens in one call (default
    settings, inputs with planted structure); the fresh prompt's also replayed from a CUDA
    graph: its device time without the host's launches;
  - the whole FlexPrefill call at default settings and at a forced ~10 % density.
Then it fits the cost model's rates (``vllm_flexprefill/costs.py``) per head_dim and prints
them in the form CALIBRATED takes, per kernel. Prints tables, writes JSON and a plot.

    python benchmarks/kernel_bench.py --out bench-results                      # Llama-3.1-8B and SmolLM2 shapes
    python benchmarks/kernel_bench.py --shapes smollm2 --lengths 4096 8192 16384 32768
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics

import torch
import triton
import triton.testing
from synthetic import paged_cache, planted_inputs, random_block_lists

from vllm_flexprefill.attention import (
    choose_kernel,
    flex_prefill_attention_varlen,
    plan_cuda,
    select_blocks,
    sparse_attention,
)
from vllm_flexprefill.config import FlexPrefillConfig
from vllm_flexprefill.costs import Rates, causal_flops
from vllm_flexprefill.kernels.block_sparse_attn import block_sparse_attention
from vllm_flexprefill.kernels.gather import gather_rows
from vllm_flexprefill.layout.batch import BatchLayout
from vllm_flexprefill.layout.lists import BlockSelection

# name: (query heads, kv heads, head_dim, default lengths)
SHAPES = {
    "llama-3.1-8b": (32, 8, 128, [8192, 16384, 32768, 65536, 131072]),
    "smollm2": (9, 3, 64, [4096, 8192, 16384, 32768]),
}
BS = 128
CHUNK = 8192
DENSITIES = (1.0, 0.5, 0.25, 0.10)


def bench(fn, reps_ms: int) -> float:
    """Median milliseconds of fn() (CUDA events, after warm-up)."""
    return triton.testing.do_bench(fn, warmup=max(25, reps_ms // 10), rep=reps_ms, return_mode="median")


def graph_of(fn):
    """fn captured in a CUDA graph (after a warm-up call on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def fa3():
    """vLLM's FlashAttention-3 varlen function, or None where vLLM is not installed."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
        from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported
    except ImportError:
        return None
    return flash_attn_varlen_func if is_fa_version_supported(3) else None


def run(shape: str, n: int, reps_ms: int) -> dict:
    hq, h, d, _ = SHAPES[shape]
    dev = "cuda"
    torch.manual_seed(n)
    row: dict = {"shape": shape, "N": n, "HQ": hq, "H": h, "D": d, "flops": causal_flops(n, n, hq, d)}
    q = torch.randn(n, hq, d, dtype=torch.bfloat16, device=dev)
    k = torch.randn(n, h, d, dtype=torch.bfloat16, device=dev)
    v = torch.randn(n, h, d, dtype=torch.bfloat16, device=dev)
    scale = d ** -0.5
    cu = torch.tensor([0, n], dtype=torch.int32, device=dev)

    expanded = (q, k.repeat_interleave(hq // h, 1), v.repeat_interleave(hq // h, 1))
    qs, ks, vs = (t.transpose(0, 1)[None] for t in expanded)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

    row["cudnn_ms"] = bench(cudnn, reps_ms)
    del qs, ks, vs
    flash = fa3()
    if flash is not None:
        row["fa3_ms"] = bench(lambda: flash(q, k, v, n, cu, n, cu, softmax_scale=scale, causal=True, fa_version=3),
                              reps_ms)
    ref_ms = row.get("fa3_ms", row["cudnn_ms"])

    layout = BatchLayout.build([n], [n], BS, dev)
    out = torch.empty_like(q)
    causal_blocks = layout.causal_blocks()
    for density in DENSITIES:
        g = torch.Generator().manual_seed(1)
        idx, cnt = random_block_lists(layout, hq, density, g)
        actual = cnt.sum().item() / (causal_blocks * hq)
        ms = bench(lambda: block_sparse_attention(q, k, v, *layout.grid(), idx, cnt, BS, scale, out=out), reps_ms)
        key = f"sparse{round(density * 100)}"
        row[f"{key}_ms"], row[f"{key}_density"] = ms, actual
        del idx, cnt
    # the same lists on a paged cache (shuffled 16-token pages), read in place as the backend does
    keys, values, rows = paged_cache(k, v, [n])
    for density in DENSITIES[:2]:
        idx, cnt = random_block_lists(layout, hq, density, torch.Generator().manual_seed(1))
        row[f"paged{round(density * 100)}_ms"] = bench(
            lambda: block_sparse_attention(q, keys, values, *layout.grid(), idx, cnt, BS, scale, out=out, k_rows=rows), reps_ms)
        del idx, cnt
    if fa4_runs():
        plan_cuda(layout, "fa4")
        for density in DENSITIES:
            sel = lists_of(layout, hq, density)
            key = f"fa4_{round(density * 100)}"
            row[f"{key}_ms"] = bench(lambda: sparse_attention(q, k, v, layout, sel, scale, out=out, kernel="fa4"),
                                     reps_ms)
            if density == 0.5:
                row["fa4_paged50_ms"] = bench(lambda: sparse_attention(q, keys, values, layout, sel, scale, out=out,
                                                                       k_rows=rows, kernel="fa4"), reps_ms)
            del sel
        k_copy, v_copy = torch.empty_like(k), torch.empty_like(v)
        row["gather_ms"] = bench(lambda: gather_rows(keys, values, rows, k_copy, v_copy), reps_ms)
        del k_copy, v_copy
        row["fa4_vs_fa3"] = ref_ms / row["fa4_100_ms"]
        row["fa4_speedup10"] = ref_ms / row["fa4_10_ms"]
    del keys, values, rows
    dense_ms = row["sparse100_ms"]
    row["ours_vs_fa3"] = ref_ms / dense_ms
    for density in DENSITIES[1:]:
        key = f"sparse{round(density * 100)}"
        row[f"eta{round(density * 100)}"] = row[f"{key}_density"] * dense_ms / row[f"{key}_ms"]

    # planted structure: the estimation per call, the whole method
    del q, k, v, out
    torch.cuda.empty_cache()
    q, k, v = planted_inputs([n], [n], hq, h, d, device=dev, seed=3, needles=16)
    default = FlexPrefillConfig(min_sparse_tokens=0)
    plan_cuda(layout)  # the per-step plans and shared buffers, as the backend's builder makes them
    row["estimate_ms"] = bench(lambda: select_blocks(q, k, layout, default, scale), reps_ms)
    try:
        row["estimate_graph_ms"] = bench(graph_of(lambda: select_blocks(q, k, layout, default, scale)), reps_ms)
    except RuntimeError as e:  # a capture failure leaves its cell "-" rather than ending the run
        print(f"{shape} N={n}: the estimation could not be captured in a CUDA graph: {e}", flush=True)
    chunk = min(CHUNK, n)
    chunk_layout = BatchLayout.build([chunk], [n], BS, dev)
    plan_cuda(chunk_layout)
    row["estimate_chunk_ms"] = bench(lambda: select_blocks(q[n - chunk:], k, chunk_layout, default, scale), reps_ms)
    # the same tokens as four requests of n / 4 in one call: the estimation's launches do not
    # grow with the requests of a step
    quarter = n // 4
    four = BatchLayout.build([quarter] * 4, [quarter] * 4, BS, dev)
    plan_cuda(four)
    row["estimate_4req_ms"] = bench(lambda: select_blocks(q[:4 * quarter], k[:4 * quarter], four, default, scale),
                                    reps_ms)
    sel = select_blocks(q, k, layout, default, scale)
    row["default_density"] = sel.density(layout).mean().item()
    row["default_query_aware"] = sel.query_aware.float().mean().item()
    row["whole_default_ms"] = bench(lambda: flex_prefill_attention_varlen(q, k, v, cu, cu, default), reps_ms)
    forced = FlexPrefillConfig(min_sparse_tokens=0, tau=0.0, min_budget=None, max_budget=max(BS, n // 40))
    row["forced_density"] = select_blocks(q, k, layout, forced, scale).density(layout).mean().item()
    row["whole_forced_ms"] = bench(lambda: flex_prefill_attention_varlen(q, k, v, cu, cu, forced), reps_ms)
    if fa4_runs():  # the defaults run FA4 here: the Triton kernel beside it
        triton_forced = dataclasses.replace(forced, kernel="triton")
        row["whole_forced_triton_ms"] = bench(lambda: flex_prefill_attention_varlen(q, k, v, cu, cu, triton_forced),
                                              reps_ms)
    row["estimate_share"] = row["estimate_ms"] / ref_ms
    row["speedup_default"] = ref_ms / row["whole_default_ms"]
    row["speedup_forced"] = ref_ms / row["whole_forced_ms"]
    return row


def fa4_runs() -> bool:
    """Whether FlashAttention-4's block-sparse forward runs on this GPU (bf16, blocks of 128)."""
    return choose_kernel("cuda", torch.bfloat16, 128, BS)[0] == "fa4"


def lists_of(layout: BatchLayout, hq: int, density: float) -> BlockSelection:
    idx, cnt = random_block_lists(layout, hq, density, torch.Generator().manual_seed(1))
    return BlockSelection(idx, cnt, cnt - 1, torch.zeros(1, hq, dtype=torch.bool, device=idx.device))


def fit(rows: list[dict], kernel: str = "triton") -> dict[int, Rates]:
    """Cost-model rates per head_dim from the measured rows (rates in TFLOP/s = 1e9 FLOP per ms),
    for the Triton kernel or FlashAttention-4 (``kernel="fa4"``: its rate on contiguous keys,
    and the copy of the keys out of the paged cache per key position and KV head)."""
    out = {}
    for d in sorted({r["D"] for r in rows}):
        rs = [r for r in rows if r["D"] == d]
        ref = "fa3_ms" if all("fa3_ms" in r for r in rs) else "cudnn_ms"
        big = [r for r in rs if r["N"] >= 16384] or rs
        dense_rate = statistics.median(r["flops"] / r[ref] / 1e9 for r in big)
        small = min(rs, key=lambda r: r["N"])
        dense_fixed = max(0.005, small[ref] - small["flops"] / dense_rate / 1e9)
        # the kernel's rate on the blocks it computes at half density (near the usual break-even),
        # reading a paged cache in place as in vLLM
        sparse_key = "fa4_50_ms" if kernel == "fa4" else "paged50_ms"
        if not all(sparse_key in r for r in big):
            continue
        sparse_rate = statistics.median(r["sparse50_density"] * r["flops"] / r[sparse_key] / 1e9 for r in big)
        gather = statistics.median(r["gather_ms"] / (r["N"] * r["H"]) for r in big) if kernel == "fa4" else 0.0
        # estimation: fixed + per (query head, key block); least squares over the rows
        xs = [r["HQ"] * -(-r["N"] // BS) for r in rs]
        ys = [r["estimate_ms"] for r in rs]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        var = sum((x - mx) ** 2 for x in xs)
        per_block = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var else 0.0
        fixed = max(0.01, my - per_block * mx)
        out[d] = Rates(round(dense_rate, 1), round(sparse_rate, 1), round(dense_fixed, 4), round(fixed, 4),
                       float(f"{per_block:.3g}"), float(f"{gather:.3g}"))
    return out


COLUMNS = [("shape", "shape", "{}"), ("N", "N", "{}"), ("cudnn_ms", "cuDNN", "{:.3f}"), ("fa3_ms", "FA3", "{:.3f}"),
           ("sparse100_ms", "ours100%", "{:.3f}"), ("ours_vs_fa3", "ours/FA3", "{:.2f}"),
           ("paged100_ms", "paged100%", "{:.3f}"), ("paged50_ms", "paged50%", "{:.3f}"),
           ("sparse50_ms", "50%", "{:.3f}"), ("sparse25_ms", "25%", "{:.3f}"), ("sparse10_ms", "10%", "{:.3f}"),
           ("eta10", "eta10", "{:.2f}"), ("fa4_100_ms", "FA4 100%", "{:.3f}"), ("fa4_vs_fa3", "FA4/FA3", "{:.2f}"),
           ("fa4_50_ms", "FA4 50%", "{:.3f}"), ("fa4_paged50_ms", "FA4 50% +copy", "{:.3f}"),
           ("fa4_25_ms", "FA4 25%", "{:.3f}"), ("fa4_10_ms", "FA4 10%", "{:.3f}"),
           ("fa4_speedup10", "FA3/FA4 10%", "{:.2f}"), ("gather_ms", "copy", "{:.3f}"),
           ("estimate_ms", "est", "{:.3f}"),
           ("estimate_graph_ms", "est(graph)", "{:.3f}"), ("estimate_chunk_ms", "est(8k)", "{:.3f}"),
           ("estimate_4req_ms", "est(4 req)", "{:.3f}"),
           ("estimate_share", "est/FA3", "{:.3f}"), ("default_density", "dens", "{:.3f}"),
           ("whole_default_ms", "whole", "{:.3f}"), ("speedup_default", "x", "{:.2f}"),
           ("forced_density", "dens(f)", "{:.3f}"), ("whole_forced_ms", "whole(f)", "{:.3f}"),
           ("speedup_forced", "x(f)", "{:.2f}"), ("whole_forced_triton_ms", "whole(f) Triton", "{:.3f}")]


def print_row(row: dict) -> None:
    print(" | ".join(fmt.format(row[key]) if key in row else "-" for key, _, fmt in COLUMNS), flush=True)


def plot(results: list[dict], path: pathlib.Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    shapes = sorted({r["shape"] for r in results})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rs = [r for r in results if r["shape"] == shape]
        ns = [r["N"] for r in rs]
        for key, label in (("fa3_ms", "FA3 (vLLM)"), ("cudnn_ms", "cuDNN SDPA"), ("sparse100_ms", "ours, 100 %"),
                           ("sparse10_ms", "ours, 10 % blocks"), ("fa4_100_ms", "FA4 lists, 100 %"),
                           ("fa4_10_ms", "FA4 lists, 10 %"), ("whole_forced_ms", "FlexPrefill, ~10 %"),
                           ("whole_default_ms", "FlexPrefill, default")):
            if all(key in r for r in rs):
                ax.loglog(ns, [r[key] for r in rs], marker="o", label=label)
        ax.set_title(shape)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("ms per layer call")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="default: per shape")
    parser.add_argument("--reps-ms", type=int, default=200)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-results"))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "python": platform.python_version()}
    try:
        import vllm
        env["vllm"] = vllm.__version__
    except ImportError:
        env["vllm"] = None
    print(env)
    print(" | ".join(title for _, title, _ in COLUMNS))
    results: list[dict] = []
    for shape in args.shapes:
        for n in args.lengths or SHAPES[shape][3]:
            results.append(run(shape, n, args.reps_ms))
            print_row(results[-1])
            torch.cuda.empty_cache()
    rates = {kernel: fit(results, kernel) for kernel in ("triton", "fa4")}
    print(f"CALIBRATED[{env['gpu']!r}] = {{")
    for kernel, by_dim in rates.items():
        print(f"    {kernel!r}: {{")
        for d, r in by_dim.items():
            print(f"        {d}: {r!r},")
        print("    },")
    print("}")
    (out / "kernels.json").write_text(json.dumps({"env": env, "results": results, "rates": {
        kernel: {d: vars(r) for d, r in by_dim.items()} for kernel, by_dim in rates.items()}}, indent=1))
    plot(results, out / "kernels.png")


if __name__ == "__main__":
    main()
