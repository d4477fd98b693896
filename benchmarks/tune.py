"""Sweeps launch settings of the block-sparse kernel (bf16) and prints ms per config, best first.

    python benchmarks/tune.py --lengths 32768 65536                 # Llama-3.1-8B shape
    python benchmarks/tune.py --shape 9 3 64 --lengths 16384 32768  # SmolLM2 (HQ H D)
    python benchmarks/tune.py --paged ...   # K/V read in place from shuffled 16-token pages, as in vLLM
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton.testing

from vllm_flexprefill.kernels.block_sparse_attn import block_sparse_attention
from vllm_flexprefill.kernels.configs import attention_config
from vllm_flexprefill.patterns.layout import BatchLayout
from vllm_flexprefill.testing import paged_cache, random_block_lists

BS = 128


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 8, 128], metavar=("HQ", "H", "D"))
    parser.add_argument("--paged", action="store_true", help="read K/V from a shuffled paged cache (vLLM's path)")
    args = parser.parse_args()
    HQ, H, D = args.shape
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
                    ms = triton.testing.do_bench(
                        lambda: block_sparse_attention(q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k,
                                                       layout.tile_seq, layout.tile_row, idx, cnt, BS, D ** -0.5,
                                                       out=out, config=cfg, k_rows=k_rows), warmup=50, rep=300,
                        return_mode="median")
                    times.append((ms, cfg))
                except Exception as e:  # out of shared memory and the like
                    print(f"  {cfg}: {type(e).__name__}", flush=True)
            for ms, cfg in sorted(times, key=lambda t: t[0]):
                print(f"  {ms:8.3f} ms  {cfg}", flush=True)


if __name__ == "__main__":
    main()
