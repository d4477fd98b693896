"""Estimation for one chunk of chunked prefill: first call (compilation included) and steady.

What vLLM's first long request pays: q = --chunk new tokens against k keys, Llama-3.1-8B
head counts, for the PyTorch selection and the fused one (kernels/head_select.py). Runs
with an empty Triton cache, so a first call shows what compilation costs.

    python benchmarks/chunk_estimate.py --keys 32768 65536 98304 131072 --out bench-results
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, nargs="+", default=[32768, 65536, 98304, 131072])
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-results"))
    args = parser.parse_args()
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cache-")  # before triton loads

    import torch

    from vllm_flexprefill.config import FlexPrefillConfig
    from vllm_flexprefill.kernels.probe import probe_stats
    from vllm_flexprefill.patterns.estimate import select_blocks
    from vllm_flexprefill.patterns.layout import BatchLayout

    def wall_ms(fn) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000

    cfg = FlexPrefillConfig(min_sparse_tokens=0)
    rows = []
    print("selection  keys     first ms   steady ms (median of 5)")
    for fused in (False, True):
        for n in args.keys:
            g = torch.Generator(device="cuda").manual_seed(n)
            q = torch.randn(args.chunk, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            layout = BatchLayout.build([args.chunk], [n], cfg.sparse_block_size, "cuda")

            def call():
                select_blocks(q, k, layout, cfg, 128 ** -0.5, probe_stats, fused=fused)

            first = wall_ms(call)
            steady = sorted(wall_ms(call) for _ in range(5))[2]
            name = "fused" if fused else "pytorch"
            rows.append({"selection": name, "keys": n, "chunk": args.chunk, "first_ms": first, "steady_ms": steady})
            print(f"{name:9s} {n:6d} {first:10.1f} {steady:11.2f}", flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    (out / "chunk_estimate.json").write_text(json.dumps({"env": env, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
