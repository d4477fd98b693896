"""When sparse attention pays: a small cost model of one attention layer call, kept as data.

For a request with ``q`` new tokens against ``k`` keys (its context plus themselves), HQ
query heads and head_dim D, causal attention does ``F = 4 * HQ * D * q * (k - (q - 1) / 2)``
floating-point operations. The model predicts, in milliseconds:

    dense  = F / dense_rate + dense_fixed
    sparse = estimate_fixed + estimate_per_block * HQ * ceil(k / BS) + density * F / sparse_rate

(plus, on the FlashAttention-4 path, ``gather_per_key`` per key position and KV head of a
chunk whose earlier keys are copied out of the paged cache). ``density`` is the share of
causal key blocks FlexPrefill computes (measured per layer by
the backend, ``backend/cost_routing.py``). Sparse runs where it is predicted faster than
dense by ``margin``. The rates depend on the GPU and on head_dim; ``benchmarks/kernel_bench.py``
measures them, and ``CALIBRATED`` below holds what it printed. An unknown device gets
``CONSERVATIVE``: sparse only where it wins with room to spare. The environment variable
``VLLM_FLEXPREFILL_RATES`` (a JSON object of ``Rates`` fields, e.g. what kernel_bench.py printed
for a GPU not listed here) replaces those fields of the chosen rates.
"""

from __future__ import annotations

import dataclasses
import json
import os


@dataclasses.dataclass(frozen=True)
class Rates:
    """Measured costs of one layer call on one GPU kind and head_dim.

    dense_rate, sparse_rate: TFLOP/s (1e9 FLOP per ms) of dense attention (FlashAttention)
        and of the block-sparse kernel on the blocks it computes.
    dense_fixed, estimate_fixed: ms per call whatever the size.
    estimate_per_block: ms per (query head, key block) of the estimation.
    gather_per_key: ms per (key position, KV head) of copying a chunk's keys and values out
        of the paged cache (FlashAttention-4 reads them contiguous; 0 for the Triton kernel,
        which reads the pages in place, and for whole prompts, whose keys are the step's own).
    """

    dense_rate: float
    sparse_rate: float
    dense_fixed: float
    estimate_fixed: float
    estimate_per_block: float
    gather_per_key: float = 0.0


# an unknown GPU: a block-sparse rate well below dense and a large fixed cost, so that sparse runs
# only where it clearly wins
CONSERVATIVE = Rates(dense_rate=600.0, sparse_rate=300.0, dense_fixed=0.02, estimate_fixed=2.0,
                     estimate_per_block=2e-5)

# device name prefix -> kernel -> head_dim -> Rates, as benchmarks/kernel_bench.py prints them for
# that GPU. The fixed cost is what a sparse call costs inside vLLM beyond its kernels' FLOPs: the
# estimation and the host's launches and Python, partly hidden behind the GPU; it is chosen end to
# end, as the value that makes the real model's time to first token best at equal accuracy (the
# rounds behind each value: docs/benchmarks.md, "the default fixed cost")
CALIBRATED: dict[str, dict[str, dict[int, Rates]]] = {
    "NVIDIA H100": {
        "triton": {
            64: Rates(dense_rate=507.6, sparse_rate=400.6, dense_fixed=0.005, estimate_fixed=0.5,
                      estimate_per_block=0.0),
            128: Rates(dense_rate=678.7, sparse_rate=421.1, dense_fixed=0.0755, estimate_fixed=1.4,
                       estimate_per_block=0.0),
        },
        "fa4": {
            64: Rates(dense_rate=507.6, sparse_rate=431.8, dense_fixed=0.005, estimate_fixed=0.5,
                      estimate_per_block=0.0, gather_per_key=2.51e-7),
            128: Rates(dense_rate=678.7, sparse_rate=589.6, dense_fixed=0.0755, estimate_fixed=1.4,
                       estimate_per_block=0.0, gather_per_key=3.75e-7),
        },
    },
    # FA4 on the H200: its dense rates times FA4's ratio to them measured on the H100, and the
    # H100's copy cost scaled by the two memories' bandwidth, until kernel_bench.py runs on an H200
    "NVIDIA H200": {
        "triton": {
            64: Rates(dense_rate=503.3, sparse_rate=314.5, dense_fixed=0.0236, estimate_fixed=0.5,
                      estimate_per_block=0.0),
            128: Rates(dense_rate=668.8, sparse_rate=425.4, dense_fixed=0.0586, estimate_fixed=1.4,
                       estimate_per_block=0.0),
        },
        "fa4": {
            64: Rates(dense_rate=503.3, sparse_rate=428.0, dense_fixed=0.0236, estimate_fixed=0.5,
                      estimate_per_block=0.0, gather_per_key=1.75e-7),
            128: Rates(dense_rate=668.8, sparse_rate=580.0, dense_fixed=0.0586, estimate_fixed=1.4,
                       estimate_per_block=0.0, gather_per_key=2.6e-7),
        },
    },
}

# on the CPU the PyTorch path is much slower than vLLM's CPU kernel: it never pays by default
CPU = Rates(dense_rate=0.2, sparse_rate=0.01, dense_fixed=0.0, estimate_fixed=50.0, estimate_per_block=1e-3)


RATES_ENV = "VLLM_FLEXPREFILL_RATES"


def rates_for(device_name: str | None, head_dim: int, kernel: str = "triton") -> Rates:
    """The calibrated rates of a device (by name prefix, e.g. "NVIDIA H100") and attention
    kernel, or conservative ones; fields given in ``VLLM_FLEXPREFILL_RATES`` replace them."""
    return with_overrides(calibrated(device_name, head_dim, kernel), os.environ.get(RATES_ENV))


def calibrated(device_name: str | None, head_dim: int, kernel: str = "triton") -> Rates:
    if device_name is None:
        return CPU
    for prefix, by_kernel in CALIBRATED.items():
        by_dim = by_kernel.get(kernel)
        if device_name.startswith(prefix) and by_dim:
            if head_dim in by_dim:
                return by_dim[head_dim]
            return by_dim[min(by_dim, key=lambda d: abs(d - head_dim))]
    return CONSERVATIVE


def with_overrides(rates: Rates, text: str | None) -> Rates:
    """``rates`` with the fields of the JSON object ``text`` (None or empty: unchanged)."""
    if not text:
        return rates
    fields = [f.name for f in dataclasses.fields(Rates)]
    try:
        given = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{RATES_ENV} must be a JSON object of {fields}, got {text!r} ({e})") from None
    if not isinstance(given, dict) or set(given) - set(fields):
        raise ValueError(f"{RATES_ENV} must be a JSON object with keys among {fields}, got {text!r}")
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                name.endswith("_rate") and value == 0):
            raise ValueError(f"{RATES_ENV}: {name} must be a non-negative number (rates positive), got {value!r}")
    return dataclasses.replace(rates, **{k: float(v) for k, v in given.items()})


def causal_flops(q_len: int, k_len: int, num_heads: int, head_dim: int) -> float:
    """FLOPs of causal attention of the last q_len of k_len positions (QK^T and PV)."""
    return 4.0 * num_heads * head_dim * q_len * (k_len - (q_len - 1) / 2)


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Predicted dense and sparse times of one layer call for a set of requests."""

    rates: Rates
    num_heads: int
    head_dim: int
    block_size: int
    margin: float = 0.95
    """Sparse must be predicted at most this share of dense: room for the model's error."""
    num_kv_heads: int | None = None
    """KV heads (default: num_heads), for the copy of a chunk's keys and values."""

    def flops(self, q_lens, k_lens) -> float:
        return sum(causal_flops(q, k, self.num_heads, self.head_dim) for q, k in zip(q_lens, k_lens))

    def dense_ms(self, q_lens, k_lens) -> float:
        return self.flops(q_lens, k_lens) / (self.rates.dense_rate * 1e9) + self.rates.dense_fixed

    def sparse_ms(self, q_lens, k_lens, density: float) -> float:
        r = self.rates
        blocks = sum(-(-k // self.block_size) for k in k_lens) * self.num_heads
        # chunks after the first (keys beyond their own) copy every key out of the paged cache
        copied = sum(k for q, k in zip(q_lens, k_lens) if q < k) * (self.num_kv_heads or self.num_heads)
        return (r.estimate_fixed * len(q_lens) + r.estimate_per_block * blocks + r.gather_per_key * copied
                + density * self.flops(q_lens, k_lens) / (r.sparse_rate * 1e9))

    def pays(self, q_lens, k_lens, density: float) -> bool:
        """True when sparse attention at ``density`` is predicted faster than dense (with the margin)."""
        return self.sparse_ms(q_lens, k_lens, density) <= self.margin * self.dense_ms(q_lens, k_lens)

    def break_even(self, q_lens, k_lens) -> float:
        """The density below which sparse pays for these requests (may be <= 0: never)."""
        fixed = self.sparse_ms(q_lens, k_lens, 0.0)
        return (self.margin * self.dense_ms(q_lens, k_lens) - fixed) * self.rates.sparse_rate * 1e9 / \
            self.flops(q_lens, k_lens)
