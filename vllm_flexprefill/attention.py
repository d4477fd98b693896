"""FlexPrefill attention: estimate the blocks that matter, then attend to those only.

Shapes (docs/algorithm.md): B batch, N tokens per sequence, T packed tokens, HQ query
heads, H key/value heads (HQ = G * H, query head h reads kv head h // G), D head dim.

    layout = plan_varlen(q, k, cu_seqlens_q, cu_seqlens_k, config)   # layout/
    selection = select_blocks(q, k, layout, config, scale)            # estimation.py
    out = sparse_attention(q, k, v, layout, selection, scale)         # kernels/ (choose_kernel)

CUDA tensors run the GPU kernels (FlashAttention-4 on Hopper where it runs, else Triton, for
the attention; Triton for the estimation); CPU tensors run their plain-PyTorch twins, which
take the same arguments: one pipeline on both. Control flows down: this module plans, the
estimation chooses, the kernels attend; layout/ holds the data and plans they share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from vllm_flexprefill.config import FlexPrefillConfig
from vllm_flexprefill.estimation import estimate_blocks
from vllm_flexprefill.layout.batch import BatchLayout
from vllm_flexprefill.layout.lists import BlockSelection
from vllm_flexprefill.layout.workspace import buffers, reuse_buffers
from vllm_flexprefill.patterns.masses import probe_row

SUPPORTED_HEAD_DIMS = (64, 128, 256)


@dataclasses.dataclass(frozen=True)
class FlexPrefillStats:
    """What the estimation chose, for inspection.

    density: [N, HQ] computed blocks / causal blocks per sequence and query head.
    query_aware: [N, HQ] bool, heads that took the query-aware pattern.
    sparse: per sequence, whether it ran the estimation (False: dense).
    """

    density: torch.Tensor
    query_aware: torch.Tensor
    sparse: tuple[bool, ...]


def as_config(config: FlexPrefillConfig | Mapping[str, Any] | None) -> FlexPrefillConfig:
    """A FlexPrefillConfig from a config, a settings dictionary (validated) or None (the defaults)."""
    if isinstance(config, FlexPrefillConfig):
        return config
    return FlexPrefillConfig.from_dict(config)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: bool) -> None:
    """Raises ValueError naming the argument and what is allowed."""
    layout = "[T, heads, head_dim]" if packed else "[B, N, heads, head_dim]"
    ndim = 3 if packed else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
        allowed = (torch.float16, torch.bfloat16) if t.is_cuda else (torch.float16, torch.bfloat16, torch.float32)
        if t.dtype not in allowed:
            raise ValueError(f"{name} must be one of {[str(d) for d in allowed]} on {t.device.type}, got {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must match q's dtype and device ({q.dtype}, {q.device}), "
                             f"got {t.dtype} on {t.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}")
    if q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"the number of query heads ({q.shape[-2]}) must be a multiple of the number of "
                         f"key/value heads ({k.shape[-2]})")
    if not packed and (q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1]):
        raise ValueError(f"q and k must have the same batch size and length for causal prefill, got "
                         f"{tuple(q.shape[:2])} and {tuple(k.shape[:2])}; use flex_prefill_attention_varlen "
                         f"for queries that are the end of a longer key range")


def lengths(cu_seqlens: torch.Tensor, name: str, total: int) -> list[int]:
    """Host lengths from cumulative offsets (one device-to-host copy when on the GPU)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
            or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D int32/int64 tensor [num_seqs + 1] of cumulative lengths")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{name} must start at 0, not decrease and end at {total} (the packed length), "
                         f"got {offsets}")
    return [b - a for a, b in zip(offsets, offsets[1:])]


def select_blocks(q: torch.Tensor, k: torch.Tensor, layout: BatchLayout, cfg: FlexPrefillConfig,
                  scale: float, k_rows: torch.Tensor | None = None,
                  count_into: torch.Tensor | None = None) -> BlockSelection:
    """Chooses the key blocks of every (query head, query tile): the batched estimation
    (``estimation.py``; four Triton launches for the whole batch on CUDA, their PyTorch
    twins elsewhere).

    k: [Tk, H, D] packed as ``layout`` says, or a paged cache view [..., H, D] read at
    ``k_rows`` [Tk] (element offsets of the key positions' rows, ``layout.paged.paged_rows``).
    count_into: optional int32 counters [C] whose sum grows by the number of blocks chosen
    (the router's measurement, ``backend.cost_routing.DensityMemory.counter``).
    """
    return estimate_blocks(q, k, layout, cfg, scale, k_rows=k_rows, count_into=count_into)


def choose_kernel(device: torch.device | str, dtype: torch.dtype, head_dim: int, block_size: int,
                  requested: str = "auto") -> tuple[str, str | None]:
    """Which block-sparse kernel runs ("fa4" or "triton"; on the CPU, its PyTorch twin), and
    why not FlashAttention-4 when it does not (None when it does or was not asked for).

    Raises ValueError when "fa4" is requested where it cannot run."""
    device = torch.device(device)
    if requested == "triton":
        return "triton", None
    if device.type != "cuda":
        return ("fa4", None) if requested == "fa4" else ("triton", None)
    from vllm_flexprefill.kernels.fa4 import unavailable

    reason = unavailable(device, dtype, head_dim, block_size)
    if reason is None:
        return "fa4", None
    if requested == "fa4":
        raise ValueError(f"kernel='fa4' was asked for, but FlashAttention-4 cannot run here: {reason}. "
                         f"Set kernel to 'auto' (FA4 where it can run, else Triton) or 'triton'.")
    return "triton", reason


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BatchLayout,
                     selection: BlockSelection, scale: float, out: torch.Tensor | None = None,
                     k_rows: torch.Tensor | None = None, k_new: torch.Tensor | None = None,
                     v_new: torch.Tensor | None = None, kernel: str = "auto") -> torch.Tensor:
    """Attends to the selected blocks with the kernel ``choose_kernel`` picks (``kernels/``;
    on the CPU, the kernels' twins). k, v as in ``select_blocks``; with ``k_rows`` (a paged
    cache), k_new, v_new [Tq, H, D] may give the layout's own keys and values when every
    sequence is a fresh prompt (FA4 then reads them instead of a copy out of the cache)."""
    if choose_kernel(q.device, q.dtype, q.shape[-1], layout.block_size, kernel)[0] == "fa4":
        return fa4_attention(q, k, v, layout, selection, scale, out, k_rows, k_new, v_new)
    args = (q, k, v, *layout.grid(),
            selection.block_idx, selection.block_cnt, layout.block_size, scale)
    if q.is_cuda:
        from vllm_flexprefill.kernels.block_sparse_attn import block_sparse_attention

        with torch.cuda.device(q.device):
            return block_sparse_attention(*args, out=out, k_rows=k_rows, split=segment_plan(layout),
                                          workspace=buffers(layout))
    from vllm_flexprefill.kernels.naive import naive_block_sparse_attention

    return naive_block_sparse_attention(*args, out=out, k_rows=k_rows)


def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BatchLayout,
                  selection: BlockSelection, scale: float, out: torch.Tensor | None, k_rows: torch.Tensor | None,
                  k_new: torch.Tensor | None, v_new: torch.Tensor | None) -> torch.Tensor:
    """The selection through FlashAttention-4's block-sparse forward (``kernels/fa4.py``; its
    twin on the CPU): keys and values made contiguous (the layout's own when every sequence
    is fresh, else copied out of the paged cache), queries padded where a chunk starts inside
    a block (``layout.plans.QueryBlocks``)."""
    from vllm_flexprefill.kernels import naive

    if q.is_cuda:
        from vllm_flexprefill.kernels.fa4 import flash_attn_block_sparse as flash
        from vllm_flexprefill.kernels.gather import gather_rows as gather
    else:
        flash, gather = naive.naive_flash_attn_block_sparse, naive.naive_gather_rows
    qb, ws = layout.query_blocks(), buffers(layout)
    hq, d = q.shape[1], q.shape[2]
    if k_rows is not None:
        if k_new is not None and layout.fresh:
            k, v = k_new, v_new
        else:
            shape = (k_rows.shape[0], k.shape[-2], k.shape[-1])
            k_out, v_out = ws.empty("fa4.k", shape, k.dtype, k.device), ws.empty("fa4.v", shape, v.dtype, v.device)
            gather(k, v, k_rows, k_out, v_out)
            k, v = k_out, v_out
    if out is None:
        out = torch.empty(q.shape[0], hq, v.shape[-1], dtype=q.dtype, device=q.device)
    lists = dict(max_seqlen_q=qb.max_seqlen_q, max_seqlen_k=qb.max_seqlen_k, mask_cnt=qb.ones.expand(hq, -1),
                 mask_idx=qb.diagonal.expand(hq, -1), full_cnt=selection.off_diagonal, full_idx=selection.block_idx,
                 cu_tiles=layout.cu_tiles, cu_lists=layout.cu_lists, block_size=layout.block_size, scale=scale)
    on = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    if not qb.padded:
        with on:
            return flash(q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k, **lists, out=out)
    # the padding rows stay zero: only the queries' rows are ever written
    q_pad = ws.zeros("fa4.q", (qb.num_rows, hq, d), q.dtype, q.device)
    q_pad.index_copy_(0, qb.q_rows, q)
    out_pad = ws.empty("fa4.out", (qb.num_rows, hq, out.shape[-1]), out.dtype, out.device)
    with on:
        flash(q_pad, k, v, qb.cu_seqlens_q, layout.cu_seqlens_k, **lists, out=out_pad)
    torch.index_select(out_pad, 0, qb.q_rows, out=out)
    return out


def dense_rows(layout: BatchLayout) -> list[int | None]:
    """Per sequence, the block row from which the estimation keeps every causal block (the
    probe's rows); None for a sequence that does not run it (its lists are the estimator's
    to make: ``estimate_blocks``)."""
    return [probe_row(layout.q_lens[s], layout.k_lens[s], layout.block_size) if layout.sparse[s] else None
            for s in range(layout.num_seqs)]


def segment_plan(layout: BatchLayout):
    """The probe rows that run in segments on CUDA (``BatchLayout.tail_split``; made once per
    layout: the builder makes it with the step's plan, the layers find it made)."""
    from vllm_flexprefill.kernels.configs import SEGMENT_BLOCKS

    return layout.tail_split(dense_rows(layout), SEGMENT_BLOCKS)


def plan_cuda(layout: BatchLayout, kernel: str = "triton") -> None:
    """Makes the per-layout plans the CUDA kernels read: the sparse-sequence table
    (``BatchLayout.sparse_seqs``) and the attention kernel's (the segment plan,
    ``segment_plan``, for "triton"; the query blocks, ``BatchLayout.query_blocks``, for
    "fa4"), and gives the layout the workspace its layer calls share (``layout/workspace.py``).
    The builder calls this once per step: in a layer's forward the plans' host-to-device
    copies would wait for the layers queued before it."""
    if kernel == "fa4":
        layout.query_blocks()
    else:
        segment_plan(layout)
    layout.sparse_seqs()
    reuse_buffers(layout)


def compile_kernels(num_heads: int, num_kv_heads: int, head_dim: int, cfg: FlexPrefillConfig, dtype: torch.dtype,
                    device: torch.device | str, count_slots: int = 0) -> None:
    """Runs the CUDA path's Triton kernels once on small inputs laid out like vLLM's paged
    cache, so that they compile at start-up rather than in the first long prompt. The kernels
    are not specialised on lengths: these compilations serve every prompt; nor is
    FlashAttention-4 (``kernels/fa4.py``), which runs where ``cfg.kernel`` picks it. Two calls: one long
    enough for the probe's rows to run in segments (``BatchLayout.tail_split``), one not; each
    counting its blocks into ``count_slots`` counters as the router's layers do (0: none; the
    count is a variant of the block-list kernel)."""
    from vllm_flexprefill.kernels.configs import SEGMENT_BLOCKS
    from vllm_flexprefill.layout.paged import paged_rows

    page, bs, scale = 16, cfg.sparse_block_size, head_dim ** -0.5
    for n in ((2 * SEGMENT_BLOCKS + 2) * bs, 3 * bs):
        q = torch.randn(n, num_heads, head_dim, dtype=dtype, device=device)
        cache = torch.randn(2, -(-n // page), page, num_kv_heads, head_dim, dtype=dtype, device=device)
        positions = torch.arange(n, device=device)
        rows = paged_rows(cache[0], positions // page, positions % page)
        layout = BatchLayout.build([n], [n], bs, device)
        counter = torch.zeros(count_slots, dtype=torch.int32, device=device) if count_slots else None
        selection = select_blocks(q, cache[0], layout, cfg, scale, rows, count_into=counter)
        sparse_attention(q, cache[0], cache[1], layout, selection, scale, k_rows=rows, kernel=cfg.kernel)


def plan_varlen(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                cfg: FlexPrefillConfig) -> BatchLayout:
    q_lens = lengths(cu_seqlens_q, "cu_seqlens_q", q.shape[0])
    k_lens = lengths(cu_seqlens_k, "cu_seqlens_k", k.shape[0])
    if len(q_lens) != len(k_lens):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{len(q_lens)} and {len(k_lens)}")
    for i, (ql, kl) in enumerate(zip(q_lens, k_lens)):
        if not 0 < ql <= kl:
            raise ValueError(f"sequence {i}: need 0 < q_len <= k_len (queries are the last q_len of the k_len "
                             f"positions), got q_len={ql}, k_len={kl}")
    sparse = [cfg.long_enough(kl) for kl in k_lens]
    return BatchLayout.build(q_lens, k_lens, cfg.sparse_block_size, q.device, sparse)


def scale_or_default(softmax_scale: float | None, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool) or not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be a positive number or None, got {softmax_scale!r}")
    return float(softmax_scale)


def plan_and_select(q, k, cu_seqlens_q, cu_seqlens_k, config, softmax_scale
                    ) -> tuple[BatchLayout, BlockSelection, float, FlexPrefillConfig]:
    """Validated config, batch plan and block selection shared by the public functions."""
    cfg = as_config(config)
    scale = scale_or_default(softmax_scale, q.shape[-1])
    layout = plan_varlen(q, k, cu_seqlens_q, cu_seqlens_k, cfg)
    return layout, select_blocks(q, k, layout, cfg, scale), scale, cfg


def flex_prefill_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    config: FlexPrefillConfig | Mapping[str, Any] | None = None,
    softmax_scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """FlexPrefill over a packed batch; each sequence's queries end its key range.

    Args:
        q: [Tq, HQ, D]; k, v: [Tk, H, D]; bf16 or fp16 (fp32 too on the CPU).
        cu_seqlens_q, cu_seqlens_k: [N + 1] int32 cumulative lengths. Sequence i has
            ``q_len <= k_len``: its queries sit at key positions ``k_len - q_len ..
            k_len - 1`` (chunked prefill, prefix-cache hits), causal.
        config: a ``FlexPrefillConfig`` or its settings as a dictionary (``{"gamma": 0.9}``;
            the reference code's keys work too). Default: ``FlexPrefillConfig()``.
            Sequences too short for sparse attention to pay run dense
            (``FlexPrefillConfig.long_enough``).
        softmax_scale: Default: 1 / sqrt(D).
        out: optional [Tq, HQ, D] buffer written in place.
    Returns:
        [Tq, HQ, D] in q's dtype.
    """
    check_inputs(q, k, v, packed=True)
    return attend_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, config, softmax_scale, out)[0]


def attend_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, config, softmax_scale, out=None
                  ) -> tuple[torch.Tensor, BatchLayout, BlockSelection]:
    """The packed call of the public functions (inputs checked): the output, and the plan and
    selection behind it."""
    layout, selection, scale, cfg = plan_and_select(q, k, cu_seqlens_q, cu_seqlens_k, config, softmax_scale)
    return sparse_attention(q, k, v, layout, selection, scale, out=out, kernel=cfg.kernel), layout, selection


# the reference code's keyword arguments that were not given (None is a value there)
_UNSET: Any = object()


def flex_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: FlexPrefillConfig | Mapping[str, Any] | float | None = None,
    tau: float | None = None,
    min_budget: int | None = _UNSET,
    max_budget: int | None = _UNSET,
    gqa_interleave: bool = False,
    softmax_scale: float | None = None,
    block_size: int | None = None,
    return_computational_ratio: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, float]:
    """Causal FlexPrefill attention for a batch of equal-length prompts.

    Two forms. This package's: ``flex_prefill_attention(q, k, v, config)`` with a
    ``FlexPrefillConfig`` or a dictionary of its fields (default: ``FlexPrefillConfig()``).
    The original FlexPrefill's, as its README writes it: ``flex_prefill_attention(q, k, v,
    gamma, tau, min_budget=512, max_budget=None)``, with that code's defaults for what is not
    given (tau 0, min_budget None: one block, block_size 128). The keywords ``tau``,
    ``min_budget``, ``max_budget`` and ``block_size`` also refine a config of the first form.

    Args:
        q: [B, N, HQ, D]; k, v: [B, N, H, D]; bf16 or fp16 (fp32 too on the CPU).
        config: the settings, or gamma (a number: the original's form).
        gqa_interleave: query head h reads KV head h % H (the original's option) instead of
            h // (HQ / H).
        softmax_scale: default 1 / sqrt(D).
        return_computational_ratio: also return the share of causal key blocks computed
            (the mean over sequences and heads; 1.0 for prompts too short to run sparse).
    Returns:
        [B, N, HQ, D] in q's dtype; with return_computational_ratio, (output, ratio).
    """
    check_inputs(q, k, v, packed=False)
    cfg = reference_config(config, tau, min_budget, max_budget, block_size)
    b, n, hq = q.shape[:3]
    h = k.shape[2]
    if gqa_interleave and hq != h:
        # query head h reads KV head h % H: reorder the query heads so that the grouped rule
        # (h // G) pairs them the same way, and put the output back in the caller's order
        order = torch.arange(hq, device=q.device).view(hq // h, h).t().reshape(-1)
        q = q[:, :, order]
    cu = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=q.device)
    out, layout, selection = attend_varlen(q.reshape(b * n, *q.shape[2:]), k.reshape(b * n, *k.shape[2:]),
                                           v.reshape(b * n, *v.shape[2:]), cu, cu, cfg, softmax_scale)
    out = out.view(b, n, hq, -1)
    if gqa_interleave and hq != h:
        out = out[:, :, torch.argsort(order)]
    if return_computational_ratio:
        return out, selection.density(layout).mean().item()
    return out


def reference_config(config, tau, min_budget, max_budget, block_size) -> FlexPrefillConfig:
    """The settings of either form of ``flex_prefill_attention`` (see there), validated."""
    given: dict[str, Any] = {}
    if tau is not None:
        given["tau"] = tau
    if block_size is not None:
        given["sparse_block_size"] = block_size
    # None is a budget (none at all): only the keywords left out take the defaults
    if min_budget is not _UNSET:
        given["min_budget"] = min_budget
    if max_budget is not _UNSET:
        given["max_budget"] = max_budget
    if isinstance(config, (int, float)) and not isinstance(config, bool):
        # the original's positional gamma, with its defaults for what is not given
        settings = {"gamma": config, "tau": 0.0, "min_budget": None, "max_budget": None}
        return FlexPrefillConfig.from_dict({**settings, **given})
    base = as_config(config)
    return dataclasses.replace(base, **given) if given else base


def flex_prefill_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    config: FlexPrefillConfig | Mapping[str, Any] | None = None,
    softmax_scale: float | None = None,
) -> FlexPrefillStats:
    """What FlexPrefill would choose for these inputs: density and query-aware heads.

    Takes the batched layout (q [B, N, HQ, D], k [B, N, H, D], no cu_seqlens) or the packed
    one (q [Tq, HQ, D], k [Tk, H, D] with cu_seqlens_q/k).
    """
    packed = cu_seqlens_q is not None
    check_inputs(q, k, k, packed=packed)
    if not packed:
        b, n = q.shape[:2]
        cu_seqlens_q = cu_seqlens_k = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=q.device)
        q, k = q.reshape(b * n, *q.shape[2:]), k.reshape(b * n, *k.shape[2:])
    elif cu_seqlens_k is None:
        raise ValueError("cu_seqlens_k is required with cu_seqlens_q")
    layout, selection, _, _ = plan_and_select(q, k, cu_seqlens_q, cu_seqlens_k, config, softmax_scale)
    return FlexPrefillStats(selection.density(layout), selection.query_aware, layout.sparse)
