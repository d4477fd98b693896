"""Launch configurations for the Triton kernels, chosen from shapes only (never GPU names)."""

from __future__ import annotations

import torch


def interpreted(t: torch.Tensor) -> bool:
    """True when a kernel on this tensor runs in Triton's CPU interpreter (TRITON_INTERPRET=1).

    The interpreter computes bf16 dot products wrongly, so kernels upcast their operands to
    float32 there; bf16 x bf16 products are exact in float32, so results do not change.
    """
    return t.device.type == "cpu"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host (``triton.cdiv`` is a constexpr function: microseconds per call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n >= 1, on the host (as ``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length()


def row_alignment(k: torch.Tensor, k_rows: torch.Tensor | None) -> int:
    """What every row offset in ``k_rows`` is a multiple of (in elements), for the kernels'
    ROW_ALIGN: 16 when every stride of the cache view but the last is, else 1.

    Offsets loaded from memory carry no alignment the compiler can see, and without one it
    reads K and V an element at a time (a paged 128k call ran at half speed). Offsets made
    by ``layout.paged.paged_rows`` are sums of multiples of the view's strides.
    """
    return 16 if k_rows is not None and rows_aligned(k) else 1


def rows_aligned(k: torch.Tensor) -> bool:
    """Whether every stride of ``k`` but the last is a multiple of 16 elements."""
    return not any(s % 16 for s in k.stride()[:-1])


# (head_dim, block_size) -> launch settings of the block-sparse kernel: the block-128 rows are
# the best of benchmarks/tune.py --paged (paged keys, full density; docs/benchmarks.md), the
# block-64 rows a rule not yet measured. Each query tile of block_size rows walks a key block
# in sub-tiles of BLOCK_N keys.
ATTENTION_CONFIGS: dict[tuple[int, int], dict[str, int]] = {
    (64, 128): {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    (128, 128): {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    (64, 64): {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    (128, 64): {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
}


def attention_config(head_dim: int, block_size: int) -> dict[str, int]:
    """Tile and pipeline settings of the block-sparse attention kernel: the measured table
    above, else a rule for the shapes it lacks."""
    if (head_dim, block_size) in ATTENTION_CONFIGS:
        return dict(ATTENTION_CONFIGS[head_dim, block_size])
    if head_dim > 128:
        # a 128 x 256 query tile already takes 64 KB of shared memory
        return {"BLOCK_N": min(block_size, 32), "num_warps": 8, "num_stages": 1}
    block_n = min(block_size, 128)
    if block_size >= 128 and head_dim >= 128:
        return {"BLOCK_N": block_n, "num_warps": 8, "num_stages": 3}
    if block_size >= 64 or head_dim >= 128:
        return {"BLOCK_N": block_n, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_N": block_n, "num_warps": 4, "num_stages": 2}


# a tile that attends to every causal block (a probe row) runs in segments of at least this
# many key blocks when it has more than twice as many (``BatchLayout.tail_split``): whole, a
# 128k row of 1024 blocks is one program that outlasts the rest of the grid
SEGMENT_BLOCKS = 32


def probe_config() -> dict[str, int]:
    """Settings of the probe-statistics kernel: BLOCKS key blocks per program, in a loop that
    keeps the probe's queries: the setting tune.py --estimation finds within a few percent of
    the best at head_dim 64 and 128 (more warps are slower at 128)."""
    return {"BLOCKS": 4, "num_warps": 4, "num_stages": 3}


def select_config(block_size: int) -> dict[str, int]:
    """Settings of the head-selection kernel: BC key blocks per step of its passes over the
    probe statistics (BC x block_size values of each array per step): at block size 128,
    64 blocks per step, the best of tune.py --estimation."""
    return {"BC": max(1, min(64, 8192 // block_size)), "num_warps": 8}
