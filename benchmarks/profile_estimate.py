"""Where the estimation's time goes: CUDA kernels and launches per call (torch.profiler).

    python benchmarks/profile_estimate.py --lengths 8192 131072
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from vllm_flexprefill.config import FlexPrefillConfig
from vllm_flexprefill.kernels.probe import probe_stats
from vllm_flexprefill.patterns.estimate import select_blocks
from vllm_flexprefill.patterns.layout import BatchLayout
from vllm_flexprefill.testing import planted_inputs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 131072])
    args = parser.parse_args()
    cfg = FlexPrefillConfig(min_sparse_tokens=0)
    for n in args.lengths:
        q, k, _ = planted_inputs([n], [n], 32, 8, 128, device="cuda", seed=1, needles=16)
        layout = BatchLayout.build([n], [n], 128, "cuda")
        for _ in range(3):
            select_blocks(q, k, layout, cfg, 128 ** -0.5, probe_stats)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                select_blocks(q, k, layout, cfg, 128 ** -0.5, probe_stats)
            torch.cuda.synchronize()
        print(f"=== N={n} (5 calls)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
