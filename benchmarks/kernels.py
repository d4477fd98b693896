"""Kernel benchmark: Llama-3.1-8B attention shapes (HQ=32, H=8, D=128, bf16), causal.

For each N it times, in one process on one GPU:
  - cuDNN SDPA (K/V expanded to 32 heads) and vLLM's FlashAttention-3 varlen kernel;
  - our block-sparse kernel at 100 / 25 / 10 / 5 % block density (random lists with sink
    and diagonal);
  - the estimation alone and the whole FlexPrefill on inputs with planted structure
    (default config, and min_budget = N/20, which lands near 10 % density).
Prints a table, writes JSON and a plot.

    python benchmarks/kernels.py --out bench-results [--lengths 8192 32768 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform

import torch
import triton
import triton.testing

from vllm_flexprefill.attention import flex_prefill_attention_varlen
from vllm_flexprefill.config import FlexPrefillConfig
from vllm_flexprefill.kernels.block_sparse_attn import block_sparse_attention
from vllm_flexprefill.kernels.probe import probe_stats
from vllm_flexprefill.patterns.estimate import select_blocks
from vllm_flexprefill.patterns.layout import BatchLayout
from vllm_flexprefill.testing import planted_inputs, random_block_lists

HQ, H, D, BS = 32, 8, 128, 128


def bench(fn, reps_ms: int) -> float:
    """Median milliseconds of fn() (CUDA events, after warm-up)."""
    return triton.testing.do_bench(fn, warmup=max(25, reps_ms // 10), rep=reps_ms, return_mode="median")


def causal_tflops(n: int, ms: float) -> float:
    return 2.0 * n * n * D * HQ / (ms * 1e-3) / 1e12


def fa3():
    """vLLM's FlashAttention-3 varlen function, or None where vLLM is not installed."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
        from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported
    except ImportError:
        return None
    return flash_attn_varlen_func if is_fa_version_supported(3) else None


def run(n: int, reps_ms: int, results: list[dict]) -> None:
    dev = "cuda"
    torch.manual_seed(n)
    row: dict = {"N": n}
    q = torch.randn(n, HQ, D, dtype=torch.bfloat16, device=dev)
    k = torch.randn(n, H, D, dtype=torch.bfloat16, device=dev)
    v = torch.randn(n, H, D, dtype=torch.bfloat16, device=dev)
    scale = D ** -0.5
    cu = torch.tensor([0, n], dtype=torch.int32, device=dev)

    qs, ks, vs = (t.transpose(0, 1)[None] for t in (q, k.repeat_interleave(HQ // H, 1), v.repeat_interleave(HQ // H, 1)))
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
    for density in (1.0, 0.25, 0.10, 0.05):
        g = torch.Generator().manual_seed(1)
        idx, cnt = random_block_lists(layout, HQ, density, g) if density < 1 else random_block_lists(layout, HQ, 1.0)
        actual = cnt.sum().item() / (causal_blocks * HQ)
        ms = bench(lambda: block_sparse_attention(q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.tile_seq,
                                                  layout.tile_row, idx, cnt, BS, scale, out=out), reps_ms)
        row[f"sparse{int(density * 100)}_ms"] = ms
        row[f"sparse{int(density * 100)}_density"] = actual
        del idx, cnt
    dense_ms = row["sparse100_ms"]
    for density in (25, 10, 5):
        # per computed block, relative to the kernel's own dense rate
        row[f"eta{density}"] = row[f"sparse{density}_density"] * dense_ms / row[f"sparse{density}_ms"]

    # planted structure: estimation alone and the whole method
    del q, k, v, out
    torch.cuda.empty_cache()
    q, k, v = planted_inputs([n], [n], HQ, H, D, device=dev, seed=3, needles=16)
    # "forced": vertical and slash floors of N/20 tokens each, about 10 % of the causal blocks
    for name, cfg in (("default", FlexPrefillConfig(min_sparse_tokens=0)),
                      ("forced", FlexPrefillConfig(min_sparse_tokens=0, min_budget=n // 20))):
        row[f"estimate_{name}_ms"] = bench(lambda: select_blocks(q, k, layout, cfg, scale, probe_stats), reps_ms)
        row[f"estimate_{name}_fused_ms"] = bench(
            lambda: select_blocks(q, k, layout, cfg, scale, probe_stats, fused=True), reps_ms)
        sel = select_blocks(q, k, layout, cfg, scale, probe_stats)
        row[f"{name}_density"] = sel.density(layout).mean().item()
        row[f"{name}_query_aware"] = sel.query_aware.float().mean().item()
        row[f"whole_{name}_ms"] = bench(lambda: flex_prefill_attention_varlen(q, k, v, cu, cu, cfg), reps_ms)
    row["estimate_share_of_dense"] = row["estimate_default_ms"] / ref_ms
    row["speedup_whole_forced_vs_ref"] = ref_ms / row["whole_forced_ms"]
    row["speedup_whole_default_vs_ref"] = ref_ms / row["whole_default_ms"]
    row["dense_vs_ref"] = ref_ms / dense_ms
    results.append(row)
    print_row(row)


COLUMNS = [("N", "N", "{}"), ("cudnn_ms", "cuDNN", "{:.2f}"), ("fa3_ms", "FA3", "{:.2f}"),
           ("sparse100_ms", "ours100%", "{:.2f}"), ("dense_vs_ref", "ours/FA3", "{:.2f}"),
           ("sparse25_ms", "25%", "{:.2f}"), ("sparse10_ms", "10%", "{:.2f}"), ("sparse5_ms", "5%", "{:.2f}"),
           ("eta10", "eta10", "{:.2f}"), ("estimate_default_ms", "est", "{:.2f}"),
           ("estimate_share_of_dense", "est/FA3", "{:.3f}"), ("estimate_default_fused_ms", "est(fused)", "{:.2f}"),
           ("default_density", "dens", "{:.3f}"), ("whole_default_ms", "whole", "{:.2f}"),
           ("speedup_whole_default_vs_ref", "x", "{:.2f}"),
           ("forced_density", "dens(10%)", "{:.3f}"), ("whole_forced_ms", "whole(10%)", "{:.2f}"),
           ("speedup_whole_forced_vs_ref", "x(10%)", "{:.2f}")]


def print_row(row: dict) -> None:
    print(" | ".join(fmt.format(row[key]) if key in row else "-" for key, _, fmt in COLUMNS), flush=True)


def plot(results: list[dict], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["N"] for r in results]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("fa3_ms", "FA3 (vLLM)"), ("cudnn_ms", "cuDNN SDPA"), ("sparse100_ms", "ours, 100 %"),
                       ("sparse10_ms", "ours, 10 % blocks"), ("whole_forced_ms", "FlexPrefill, ~10 %"),
                       ("whole_default_ms", "FlexPrefill, default")):
        if all(key in r for r in results):
            ax.loglog(ns, [r[key] for r in results], marker="o", label=label)
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("ms per layer (32 q heads, 8 kv heads, d 128)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--reps-ms", type=int, default=400)
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
    for n in args.lengths:
        run(n, args.reps_ms, results)
        torch.cuda.empty_cache()
    (out / "kernels.json").write_text(json.dumps({"env": env, "results": results}, indent=1))
    plot(results, out / "kernels.png")


if __name__ == "__main__":
    main()
