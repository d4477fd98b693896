"""Where one FlexPrefill layer call spends its time, the way the CUDA backend runs it.

One chunk of ``--new`` tokens at the end of ``--keys`` keys, cached in a paged KV cache:
the backend's steps (find the rows of the request's keys in their pages, choose the
blocks, attend, record the density for the router; the kernels read the pages in place)
timed one by one and whole, beside FlashAttention-3 reading the same pages (the dense
path), then a torch.profiler table of one whole call (host and device time per operation). The gap between the kernel benchmark's
prediction and the end-to-end TTFT is what this is for.

    python benchmarks/profile_layer.py --shape 9 3 64 --new 16384 --keys 32768     # SmolLM2, 2nd chunk at 32k
    python benchmarks/profile_layer.py --shape 32 8 128 --new 8192 --keys 131072   # Llama-3.1-8B
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

PAGE = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[9, 3, 64], metavar=("HQ", "H", "D"))
    parser.add_argument("--new", type=int, default=16384)
    parser.add_argument("--keys", type=int, default=32768)
    parser.add_argument("--settings", default="{}", help="FlexPrefill settings as JSON")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--host-top", type=int, default=14,
                        help="functions of the host-side (cProfile) breakdown of the whole call to print")
    args = parser.parse_args()

    import json

    from synthetic import planted_inputs

    from vllm_flexprefill.attention import choose_kernel, select_blocks, sparse_attention
    from vllm_flexprefill.backend.cost_routing import DensityMemory
    from vllm_flexprefill.backend.routing import plan_batch
    from vllm_flexprefill.backend.sparse import sparse_prefill
    from vllm_flexprefill.config import FlexPrefillConfig
    from vllm_flexprefill.layout.paged import paged_rows

    hq, h, d = args.shape
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    cfg = FlexPrefillConfig.from_dict({**json.loads(args.settings), "min_sparse_tokens": 0,
                                       "min_sparse_query_tokens": 0})
    q, k, v = planted_inputs([args.new], [args.keys], hq, h, d, dtype=dtype, device=dev, seed=1)
    pages = -(-args.keys // PAGE)
    perm = torch.randperm(pages, generator=torch.Generator().manual_seed(0)) + 1
    key_cache = torch.zeros(pages + 1, PAGE, h, d, dtype=dtype, device=dev)
    value_cache = torch.zeros_like(key_cache)
    pos = torch.arange(args.keys, device=dev)
    key_cache[perm.to(dev)[pos // PAGE], pos % PAGE] = k
    value_cache[perm.to(dev)[pos // PAGE], pos % PAGE] = v
    table = perm[None].to(torch.int32).to(dev)
    # the block-sparse kernel the backend would run here (FlashAttention-4 or Triton)
    sparse_kernel = choose_kernel(dev, dtype, d, cfg.sparse_block_size, cfg.kernel)[0]
    plan = plan_batch(torch.tensor([0, args.new], dtype=torch.int32), torch.tensor([args.keys]), table, PAGE, cfg,
                      decode_threshold=1, kernel=sparse_kernel)
    name = "model.layers.0.self_attn.attn"
    plan = dataclasses.replace(plan, memory=DensityMemory([name], dev))
    (group,) = plan.groups
    scale = d ** -0.5
    out = torch.empty_like(q)

    def rows():
        return paged_rows(key_cache, group.kv_pages, group.kv_offsets)

    k_rows = rows()
    selection = select_blocks(q, key_cache, group.layout, cfg, scale, k_rows)

    def whole():
        # as the CUDA backend runs it: the kernels read the pages in place
        sparse_prefill(q, key_cache, value_cache, group, plan, scale, out=out, layer_name=name, k_rows=rows())

    steps = {"cache rows": rows,
             "choose blocks": lambda: select_blocks(q, key_cache, group.layout, cfg, scale, k_rows),
             "attend": lambda: sparse_attention(q, key_cache, value_cache, group.layout, selection, scale, out=out,
                                                k_rows=k_rows, kernel=sparse_kernel),
             "whole call (backend)": whole}
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        cu_q = torch.tensor([0, args.new], dtype=torch.int32, device=dev)
        seqused = torch.tensor([args.keys], dtype=torch.int32, device=dev)
        steps["FlashAttention-3 (dense path)"] = lambda: flash_attn_varlen_func(
            q, key_cache, value_cache, args.new, cu_q, args.keys, seqused_k=seqused, block_table=table,
            softmax_scale=scale, causal=True, fa_version=3)
    except ImportError:
        pass

    density = selection.density(group.layout).mean().item()
    from ruler import package_folder

    package = package_folder()
    print(f"HQ {hq} H {h} D {d}: {args.new} new tokens at the end of {args.keys} keys, density {density:.3f}, {dev}, "
          f"package in {package}, kernel {sparse_kernel}")
    print(f"{'step':<32} {'device ms':>10} {'host ms':>10}")
    for label, fn in steps.items():
        for _ in range(3):
            fn()
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        sync()
        host = time.perf_counter()
        if dev == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        for _ in range(args.reps):
            fn()
        host = (time.perf_counter() - host) * 1000 / args.reps  # launching, without waiting
        device_ms = float("nan")
        if dev == "cuda":
            end.record()
            sync()
            device_ms = start.elapsed_time(end) / args.reps
        print(f"{label:<32} {device_ms:>10.3f} {host:>10.3f}")

    # where the whole call's host time goes, by Python function (Triton's launcher included);
    # the kernels run asynchronously, so this is the host's share only
    import cProfile
    import pstats

    host_profile = cProfile.Profile()
    host_profile.enable()
    for _ in range(args.reps):
        whole()
    host_profile.disable()
    if dev == "cuda":
        torch.cuda.synchronize()
    print(f"host time of the whole call by function, ms per call ({args.reps} calls):")
    host_stats = pstats.Stats(host_profile)
    top = sorted(host_stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)[:args.host_top]
    for (file, line, func), (_calls, ncalls, tottime, cumtime, _callers) in top:
        where = f"{file.rsplit('/', 2)[-2]}/{file.rsplit('/', 1)[-1]}:{line}" if "/" in file else file
        print(f"  {cumtime * 1000 / args.reps:8.3f} cum {tottime * 1000 / args.reps:8.3f} self "
              f"{ncalls / args.reps:5.1f}x  {func} ({where})")

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=activities) as prof:
        whole()
        if dev == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if dev == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25))


if __name__ == "__main__":
    main()
