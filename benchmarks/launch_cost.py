"""Host time of one kernel launch, by the way it is launched, and of the small PyTorch ops
a sparse layer call makes, on the GPU's host.

A sparse layer call on a small model is host-bound (docs/benchmarks.md: profile_layer.py),
and cProfile's per-call overhead inflates the launch path it breaks down. This times each
way in a plain loop instead: a kernel that does nothing, launched through Triton
(``kernel[grid]``), through ``kernels/launch.py``'s memoised launcher, through the
compiled kernel's runner (``compiled[grid]``) and, where ``launch.direct`` exists, through
the compiled kernel's own launcher; then torch.empty / torch.zeros / an in-place add of a
few bytes. Microseconds per call, median of five loops.

    python benchmarks/launch_cost.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import triton
import triton.language as tl


@triton.jit
def nothing_kernel(x, n, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    if i < 0:  # never: the launch alone is timed
        tl.store(x + n, 0.0)


def per_call_us(fn, calls: int) -> float:
    """Median over five loops of the host time per call, the GPU drained before each loop."""
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) * 1e6 / calls)
    torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    from vllm_flexprefill.kernels import launch

    x = torch.zeros(1024, device="cuda")
    grid = (4, 9, 1)
    memo = launch.launcher(nothing_kernel)
    memo[grid](x, 100, BLOCK=64)  # compiles and memoises
    (compiled, *_rest), = memo.compiled.values()
    ways = {
        "Triton, kernel[grid](...)": lambda: nothing_kernel[grid](x, 100, BLOCK=64),
        "memoised launcher (kernels/launch.py)": lambda: memo[grid](x, 100, BLOCK=64),
        "compiled kernel's runner, compiled[grid]": lambda: compiled[grid](x, 100, 64),
    }
    direct = getattr(launch, "direct", None)
    go = direct(compiled) if direct is not None else None
    if go is not None:
        stream = launch.current_stream(x.device.index)
        ways["compiled kernel's own launcher (launch.direct)"] = lambda: go(grid, stream, (x, 100, 64))
    small = torch.zeros(16, device="cuda")
    ways |= {
        "torch.empty(16) on CUDA": lambda: torch.empty(16, device="cuda"),
        "torch.zeros(16) on CUDA": lambda: torch.zeros(16, device="cuda"),
        "in-place add of 16 floats": lambda: small.add_(1.0),
        "torch.cuda.current_stream()": lambda: torch.cuda.current_stream(),
    }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}")
    print(f"{'host us per call':>18}  way")
    for label, fn in ways.items():
        print(f"{per_call_us(fn, args.calls):18.2f}  {label}")


if __name__ == "__main__":
    main()
