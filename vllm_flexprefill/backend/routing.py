"""Per-step planning: which requests of a batch run FlexPrefill, and how to reach their data.

Runs once per batch in the metadata builder, from host copies of the lengths, so that a
layer's ``forward`` does no host synchronisation.
"""

from __future__ import annotations

import dataclasses

import torch

from vllm_flexprefill import stats
from vllm_flexprefill.attention import plan_cuda
from vllm_flexprefill.backend.compat import slice_metadata
from vllm_flexprefill.backend.cost_routing import DensityMemory, Router, length_bucket
from vllm_flexprefill.config import FlexPrefillConfig
from vllm_flexprefill.layout.batch import BatchLayout

# key positions of one FlexPrefill call: bounds the CPU path's transient copy of the cached
# keys and values (on CUDA the kernels read the pages in place); a longer request runs alone
MAX_GATHER_TOKENS = 1 << 17


@dataclasses.dataclass(frozen=True)
class SparseGroup:
    """Sparse requests whose keys and values are gathered and run together.

    layout: the requests packed in batch order (their queries are the last q_len of
        seq_len positions).
    q_rows: where their query tokens sit in the batch: a slice when they are
        contiguous, else a [Tq] int64 index.
    kv_pages, kv_offsets: [Tk] int64 page and in-page offset of every key position
        0 .. seq_len-1 of every request in the paged KV cache (None where only fresh
        prompts run sparse and their keys are the layer's inputs).
    requests: their indices in the batch.
    causal_blocks: key blocks a dense pass over their query tiles visits, per head.
    bucket: the router's length bucket of their longest request.
    cache_rows: filled by the CUDA layers: cache strides -> [Tk] element offsets of the
        key positions' rows (one computation per step, not per layer).
    """

    layout: BatchLayout
    q_rows: slice | torch.Tensor
    kv_pages: torch.Tensor | None
    kv_offsets: torch.Tensor | None
    requests: tuple[int, ...]
    causal_blocks: int
    bucket: int
    cache_rows: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class SparsePlan:
    """The requests of one batch that run FlexPrefill, in groups, and the dense rest.

    dense_runs: request ranges [r0, r1) that run the dense delegate.
    config: the settings the plan was made with, which the layers run it with.
    sparse_layers: rows (in ``memory``) of the layers that run the groups sparse; the
        others run the whole batch dense. None: every layer runs them sparse.
    measure_layers: rows of the layers that run the whole batch dense and, for the
        groups, the estimation alone, to measure their density.
    memory: where the layers record the density they measure (None: nowhere).
    kernel: the block-sparse attention kernel the groups run ("fa4" or "triton",
        ``attention.choose_kernel``; on the CPU, its twin).
    """

    requests: tuple[int, ...]
    groups: tuple[SparseGroup, ...]
    dense_runs: tuple[tuple[int, int], ...]
    config: FlexPrefillConfig
    sparse_layers: frozenset[int] | None = None
    memory: DensityMemory | None = None
    measure_layers: frozenset[int] = frozenset()
    kernel: str = "triton"

    def runs_sparse(self, layer_name: str) -> bool:
        """Whether this layer runs the plan's groups sparse (else the whole batch runs dense)."""
        if self.sparse_layers is None:
            return True
        return self.memory.rows.get(layer_name, -1) in self.sparse_layers

    def measures(self, layer_name: str) -> bool:
        """Whether this layer (running dense) measures the groups' density."""
        return bool(self.measure_layers) and self.memory.rows.get(layer_name, -1) in self.measure_layers


def choose_sparse(q_lens: list[int], seq_lens: list[int], cfg: FlexPrefillConfig, decode_threshold: int,
                  fresh_only: bool, router: Router | None = None) -> list[bool]:
    """Per request: True when it is a prefill that may run FlexPrefill: by the fixed
    thresholds where the config sets them, else where the router's cost model says it may pay."""
    min_keys = cfg.min_sparse_tokens or 0
    min_new = cfg.min_sparse_query_tokens or 0
    return [
        ql > decode_threshold and sl >= min_keys and ql >= min(min_new, sl) and (not fresh_only or ql == sl)
        and (router is None or router.candidate(ql, sl))
        for ql, sl in zip(q_lens, seq_lens)
    ]


def dense_runs(sparse: list[bool]) -> tuple[tuple[int, int], ...]:
    """Maximal ranges of consecutive dense requests."""
    runs = []
    start = None
    for i, s in enumerate([*sparse, True]):
        if not s and start is None:
            start = i
        elif s and start is not None:
            runs.append((start, i))
            start = None
    return tuple(runs)


def plan_batch(
    query_start_loc_cpu: torch.Tensor,
    seq_lens_cpu: torch.Tensor,
    block_table: torch.Tensor | None,
    page_size: int,
    cfg: FlexPrefillConfig,
    decode_threshold: int,
    fresh_only: bool = False,
    max_gather_tokens: int | None = None,
    router: Router | None = None,
    kernel: str = "triton",
) -> SparsePlan | None:
    """Plans a batch; None when no request runs FlexPrefill (the dense delegate takes all).

    Args:
        query_start_loc_cpu: [num_reqs + 1] host offsets of each request's new tokens.
        seq_lens_cpu: [num_reqs] host context + new tokens per request.
        block_table: [num_reqs, max_pages] page ids, or None (fresh prompts only).
        page_size: tokens per KV-cache page (the kernel block size of the block table).
        max_gather_tokens: key positions per group (default MAX_GATHER_TOKENS).
        router: the cost model and measured densities that decide which requests and
            layers run sparse; None: the config's fixed thresholds, every layer sparse.
        kernel: the attention kernel the groups run (its plans are made here).
    """
    starts = query_start_loc_cpu.tolist()
    q_lens = [b - a for a, b in zip(starts, starts[1:])]
    seq_lens = seq_lens_cpu.tolist()[:len(q_lens)]
    if router is not None:
        # every prefill step, so that measurements land before the next candidate needs them
        router.memory.refresh()
    sparse = choose_sparse(q_lens, seq_lens, cfg, decode_threshold, fresh_only, router)
    route = None
    if router is not None and any(sparse):
        route = router.route_layers([q for q, s in zip(q_lens, sparse) if s],
                                    [k for k, s in zip(seq_lens, sparse) if s])
        if not route.sparse and not route.measure:
            sparse = [False] * len(sparse)
    if stats.path() is not None:
        # "sparse": planned sparse (in the layers the router chose; all of them without a router)
        stats.append({"kind": "step", "requests": [
            {"new": q, "all": k, "route": "sparse" if s and (route is None or route.sparse) else "dense"}
            for q, k, s in zip(q_lens, seq_lens, sparse) if q > decode_threshold]})
    requests = tuple(i for i, s in enumerate(sparse) if s)
    if not requests:
        return None
    cap = max_gather_tokens or MAX_GATHER_TOKENS
    groups, current, gathered = [], [], 0
    for i in requests:
        if current and gathered + seq_lens[i] > cap:
            groups.append(current)
            current, gathered = [], 0
        current.append(i)
        gathered += seq_lens[i]
    groups.append(current)
    built = tuple(plan_group(g, starts, q_lens, seq_lens, block_table, page_size, cfg, kernel) for g in groups)
    if route is None:
        return SparsePlan(requests, built, dense_runs(sparse), cfg, kernel=kernel)
    return SparsePlan(requests, built, dense_runs(sparse), cfg, route.sparse, router.memory, route.measure, kernel)


def plan_group(requests: list[int], starts: list[int], q_lens: list[int], seq_lens: list[int],
               block_table: torch.Tensor | None, page_size: int, cfg: FlexPrefillConfig,
               kernel: str = "triton") -> SparseGroup:
    """Layout, query rows and cache positions of one group of sparse requests."""
    device = block_table.device if block_table is not None else "cpu"
    sk = [seq_lens[i] for i in requests]
    layout = BatchLayout.build([q_lens[i] for i in requests], sk, cfg.sparse_block_size, device)
    contiguous = all(b == a + 1 for a, b in zip(requests, requests[1:]))
    if contiguous:
        q_rows: slice | torch.Tensor = slice(starts[requests[0]], starts[requests[-1] + 1])
    else:
        # made on the device: a copy from pageable host memory would wait for the GPU's queue
        q_rows = torch.cat([torch.arange(starts[i], starts[i + 1], device=device) for i in requests])
    kv_pages = kv_offsets = None
    if block_table is not None:
        positions = [torch.arange(n, device=device) for n in sk]
        kv_pages = torch.cat([block_table[i, pos // page_size].long() for i, pos in zip(requests, positions)])
        kv_offsets = torch.cat([pos % page_size for pos in positions])
    if layout.tile_seq.is_cuda:
        plan_cuda(layout, kernel)
    return SparseGroup(layout, q_rows, kv_pages, kv_offsets, tuple(requests), layout.causal_blocks(),
                       length_bucket(max(sk)))


def dense_run_metadata(cm, plan: SparsePlan, build) -> tuple:
    """(first token, end token, ``build(metadata of the run)``) for each run of dense requests."""
    runs = []
    for r0, r1 in plan.dense_runs:
        run_cm, t0, t1 = slice_metadata(cm, r0, r1)
        runs.append((t0, t1, build(run_cm)))
    return tuple(runs)


def extend_metadata(metadata, cls, **extra):
    """``cls`` (a dataclass deriving from ``type(metadata)``) holding metadata's fields and ``extra``."""
    fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata) if f.init}
    return cls(**fields, **extra)
