"""Sweeps launch settings of the block-sparse kernel (bf16) and prints ms per config, best first.

    python benchmarks/tune.py --lengths 32768 65536                 # Llama-3.1-8B shape
    python benchmarks/tune.py --shape 9 3 64 --lengths 16384 32768  # SmolLM2 (HQ H D)
    python benchmarks/tune.py --paged ...   # K/V read in place from shuffled 16-token pages, as in vLLM
    python benchmarks/tune.py --estimation ...  # instead: the probe and head-selection kernels
                                                # (kernels/configs.py probe_config, select_config)
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton.testing
from synthetic import paged_cache, planted_inputs, random_block_lists

from vllm_flexprefill.config import FlexPrefillConfig
from vllm_flexprefill.kernels.block_sparse_attn import block_sparse_attention
from vllm_flexprefill.kernels.configs import attention_config, probe_config, select_config
from vllm_flexprefill.kernels.head_select import select_heads
from vllm_flexprefill.kernels.probe import probe_stats
from vllm_flexprefill.layout.batch import BatchLayout

BS = 128


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def report(title: str | None, times: list[tuple[float, dict]]) -> None:
    if title:
        print(title, flush=True)
    for ms, cfg in sorted(times, key=lambda t: t[0]):
        print(f"  {ms:8.3f} ms  {cfg}", flush=True)


def tune_estimation(n: int, hq: int, h: int, d: int) -> None:
    """The probe kernel (runs of key blocks per program, warps, stages) and the head
    selection (blocks per step of its passes, warps) on planted inputs in a paged cache,
    default settings, one prompt of n tokens."""
    q, k, v = planted_inputs([n], [n], hq, h, d, device="cuda", seed=3, needles=16)
    keys, _values, rows = paged_cache(k, v, [n])
    layout = BatchLayout.build([n], [n], BS, "cuda")
    cfg, scale = FlexPrefillConfig(), d ** -0.5
    times = []
    for blocks, warps, stages in itertools.product((1, 2, 4, 8), (4, 8), (2, 3)):
        launch = {"BLOCKS": blocks, "num_warps": warps, "num_stages": stages}
        try:
            times.append((bench(lambda: probe_stats(q, keys, layout, scale, k_rows=rows, config=launch)),
                          launch))
        except Exception as e:  # out of resources and the like
            print(f"  {launch}: {type(e).__name__}", flush=True)
    report(f"probe N={n} HQ={hq} H={h} D={d} paged default={probe_config()}", times)
    m, l, k_bar, q_probe_bar = probe_stats(q, keys, layout, scale, k_rows=rows)
    times = []
    for bc, warps in itertools.product((16, 32, 64), (4, 8)):
        launch = {"BC": bc, "num_warps": warps}
        times.append((bench(lambda: select_heads(m, l, k_bar, q_probe_bar, layout, scale, cfg.gamma, cfg.tau,
                                                 cfg.min_blocks, cfg.max_blocks, config=launch)), launch))
    report(f"head selection N={n} HQ={hq} default={select_config(BS)}", times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 8, 128], metavar=("HQ", "H", "D"))
    parser.add_argument("--paged", action="store_true", help="read K/V from a shuffled paged cache (vLLM's path)")
    parser.add_argument("--estimation", action="store_true", help="tune the estimation's kernels instead")
    args = parser.parse_args()
    HQ, H, D = args.shape
    if args.estimation:
        for n in args.lengths:
            tune_estimation(n, HQ, H, D)
        return
    for n in args.lengths:
        q = torch.randn(n, HQ, D, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(n, H, D, dtype=torch.bfloat16, device="cuda")
        v = torch.randn(n, H, D, dtype=torch.bfloat16, device="cuda")
        layout = BatchLayout.build([n], [n], BS, "cuda")
        out = torch.empty_like(q)
        k_rows = None
        if args.paged:
            k, v, k_rows = paged_cache(k, v, [n])
        for density in (1.0, 0.1):
            idx, cnt = random_block_lists(layout, HQ, density, torch.Generator().manual_seed(0))
            print(f"N={n} HQ={HQ} H={H} D={D} density={density} paged={args.paged} "
                  f"default={attention_config(D, BS)}")
            times = []
            for block_n, warps, stages in itertools.product((64, 128), (4, 8), (2, 3, 4)):
                cfg = {"BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
                try:
                    times.append((bench(lambda: block_sparse_attention(
                        q, k, v, *layout.grid(), idx,
                        cnt, BS, D ** -0.5, out=out, config=cfg, k_rows=k_rows)), cfg))
                except Exception as e:  # out of shared memory and the like
                    print(f"  {cfg}: {type(e).__name__}", flush=True)
            report(None, times)


if __name__ == "__main__":
    main()
