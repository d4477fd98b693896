"""Where sparse attention pays, decided per step and per layer, without host synchronisation.

The builder asks a ``Router`` each step. A request is a candidate when, at the lowest
density its budget floor allows, the cost model (``costs.py``) predicts sparse faster
than dense. Each layer then runs sparse for the candidates when the density that layer
measured recently (at a similar length) is below the break-even density; diffuse layers
run dense. Densities come from the layers themselves: each FlexPrefill layer call's kernels
add the blocks it computes into device counters (``DensityMemory.counter``, no
synchronisation);
the next step's builder copies that buffer to the host asynchronously and folds in the
copy of the step before, once its event says it has landed.

A layer never runs sparse on a guess. Where its density at this length is unknown it
*measures*: it runs dense and the estimation alone, which costs a few percent of the
dense call. A length never measured borrows the layer's estimate at the nearest shorter
length (densities fall with length), and measures when that one is close to break-even.
A layer kept dense measures again every ``REMEASURE_STEPS`` steps, so it follows the
prompts it serves; the layers' turns are spread over those steps (a step where every
layer measured would pay every layer's estimation at once).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from vllm_flexprefill.config import FlexPrefillConfig
from vllm_flexprefill.costs import CostModel

# the density the start-up message assumes, to say from which length sparse may pay
TYPICAL_DENSITY = 0.5
# key-length buckets of half an octave: < 5.8k, 5.8-8k, 8-11.6k, 11.6-16k, ..., >= 1M; a
# chunk's density depends on how many keys it sees (the floor weighs less on longer ones)
NUM_BUCKETS = 16
# weight of a new measurement; steps a layer runs dense before it measures again; a
# borrowed estimate up to BORROW_MARGIN x break-even is measured rather than trusted
NEW_WEIGHT = 0.5
REMEASURE_STEPS = 64
BORROW_MARGIN = 1.5
# counters per (layer, bucket): a layer call's programs each add their block count into one
# of them, so that the atomic adds spread over addresses instead of queueing on one
COUNT_SLOTS = 32


def length_bucket(k_len: int) -> int:
    return min(NUM_BUCKETS - 1, max(0, int(2 * math.log2(max(k_len, 1))) - 24))


class DensityMemory:
    """Measured density per (layer, key-length bucket), learnt across steps.

    Args:
        layer_names: the attention layers of one KV-cache group, in model order.
        device: where the layers run.
    """

    def __init__(self, layer_names: list[str], device: torch.device | str):
        self.rows = {name: i for i, name in enumerate(layer_names)}
        shape = (len(layer_names), NUM_BUCKETS)
        self.device = torch.device(device)
        # written by the layers' kernels: the blocks they computed per (layer, bucket), over
        # COUNT_SLOTS counters; the causal blocks behind each count are added on the host,
        # where the calls are made
        self.counts = torch.zeros((*shape, COUNT_SLOTS), dtype=torch.int32, device=self.device)
        self.slots = [[self.counts[row, b] for b in range(NUM_BUCKETS)] for row in range(len(layer_names))]
        # causal blocks behind the counts per (layer, bucket) counted since the last copy: a
        # step where no layer counted (every request dense) neither copies nor folds, and a
        # fold reads these pairs alone
        self.causal: dict[tuple[int, int], int] = {}
        # host estimates per (layer, bucket), read per layer each step; NaN: never measured
        self.estimate = [[math.nan] * NUM_BUCKETS for _ in layer_names]
        # steps each (layer, bucket) ran dense since it last measured
        self.dense_steps = [[0] * NUM_BUCKETS for _ in layer_names]
        # one pinned host buffer, the causal blocks behind it, and the event of the copy into it
        self._host = torch.empty(self.counts.shape, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        self._host_causal: dict[tuple[int, int], int] = {}
        self._copied: torch.cuda.Event | None = None

    def counter(self, layer_name: str, bucket: int, causal_blocks: int) -> torch.Tensor | None:
        """The [COUNT_SLOTS] int32 device counters into which one layer call adds the blocks it
        computes (their sum is what counts), out of ``causal_blocks``; None for a layer this
        memory does not hold. No device op: the call's block-list kernel adds to them."""
        row = self.rows.get(layer_name)
        if row is None:
            return None
        self.causal[row, bucket] = self.causal.get((row, bucket), 0) + causal_blocks
        return self.slots[row][bucket]

    def refresh(self) -> None:
        """Folds in the measurements that reached the host; starts copying the newest ones
        (nothing at all where nothing was counted or is in flight)."""
        if not self.causal and self._copied is None:
            return
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return  # a CUDA graph capture (dummy batches) neither copies nor folds
        causal, self.causal = self.causal, {}
        if self.device.type != "cuda":
            self._fold(self.counts.sum(-1).tolist(), causal)
            self.counts.zero_()
            return
        if self._copied is not None:
            if not self._copied.query():
                # the previous copy is still in flight: its counts keep growing until the next copy
                self.causal = causal
                return
            self._fold(self._host.sum(-1).tolist(), self._host_causal)
            self._copied = None
        if not causal:
            return
        self._host.copy_(self.counts, non_blocking=True)
        self._host_causal = causal
        self.counts.zero_()
        self._copied = torch.cuda.Event()
        self._copied.record()

    def _fold(self, computed: list[list[int]], causal: dict[tuple[int, int], int]) -> None:
        """Blends each measured (layer, bucket) density (computed blocks, host lists, over the
        causal blocks behind them) into its estimate."""
        for (row, b), n in causal.items():
            if n:
                mean = computed[row][b] / n
                old = self.estimate[row][b]
                self.estimate[row][b] = mean if math.isnan(old) else (1 - NEW_WEIGHT) * old + NEW_WEIGHT * mean

    def density(self, layer: int, bucket: int) -> tuple[float, bool]:
        """(estimate, whether it was measured at this bucket): else the nearest shorter
        bucket's estimate; NaN where the layer has none."""
        row = self.estimate[layer]
        for b in range(bucket, -1, -1):
            if not math.isnan(row[b]):
                return row[b], b == bucket
        return math.nan, False


@dataclasses.dataclass(frozen=True)
class LayerRoute:
    """One step's layers: ``sparse`` run the candidates sparse, ``measure`` run dense and
    the estimation alone (to learn their density); the rest run dense."""

    sparse: frozenset[int]
    measure: frozenset[int]


class Router:
    """Per-step decisions: which requests are candidates, which layers run them sparse.

    Args:
        config: the settings; fixed thresholds (``min_sparse_tokens`` ...) bypass the model.
        cost: the cost model of this model's attention layers on this device.
        memory: the densities the layers measure.
    """

    def __init__(self, config: FlexPrefillConfig, cost: CostModel, memory: DensityMemory):
        self.config, self.cost, self.memory = config, cost, memory
        # the prompt length from which sparse attention may pay (None: not below max_model_len)
        self.sparse_from: int | None = None

    def floor_density(self, q_len: int, k_len: int) -> float:
        """The least density the budget floor allows: min_blocks verticals and offsets per
        tile, the probe's tiles dense."""
        bs = self.config.sparse_block_size
        nb = -(-k_len // bs)
        first = (k_len - q_len) // bs
        causal = (nb * (nb + 1) - first * (first + 1)) // 2  # rows first .. nb-1, row r has r + 1 blocks
        per_row = min(2 * self.config.min_blocks, nb)
        dense_rows = 2 * nb
        return min(1.0, ((nb - first) * per_row + dense_rows) / causal)

    def candidate(self, q_len: int, k_len: int) -> bool:
        return self.cost.pays([q_len], [k_len], self.floor_density(q_len, k_len))

    def route_layers(self, q_lens: list[int], k_lens: list[int]) -> LayerRoute:
        """Sparse where the candidates' estimated density is below break-even; measure
        where it is unknown, borrowed and close, or old. (``plan_batch`` refreshes the
        memory first.)"""
        bucket = length_bucket(max(k_lens))
        even = self.cost.break_even(q_lens, k_lens)
        sparse, measure = set(), set()
        layers = len(self.memory.rows)
        for layer in range(layers):
            density, own = self.memory.density(layer, bucket)
            steps = self.memory.dense_steps[layer]
            if density <= even:
                sparse.add(layer)
                steps[bucket] = 0
            elif steps[bucket] >= REMEASURE_STEPS:
                measure.add(layer)
                steps[bucket] = 0
            elif math.isnan(density) or (not own and density <= BORROW_MARGIN * even):
                # layers that measure together for want of an estimate come back to it in
                # turns: each later by its share of REMEASURE_STEPS
                measure.add(layer)
                steps[bucket] = -(layer * REMEASURE_STEPS // layers)
            else:
                steps[bucket] += 1
        return LayerRoute(frozenset(sparse), frozenset(measure))
