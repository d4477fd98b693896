"""Building the per-(query head, query tile) key-block lists of a whole batch in one pass.

A tile at block row ``r`` keeps key block ``c <= r`` when column c is a chosen vertical,
when offset ``r - c`` is a chosen slash, or (query-aware heads only) when the pooled
block map ``P[r, c]`` reaches the head's threshold. Dense sequences, and the tiles from
row ``dense_from`` on (those holding the probe queries), keep every ``c <= r``.
One program per (tile, head), over the tiles of every sequence, compacts the chosen ids
with a prefix sum into the tile's list (``layout/lists.py``) and pads it with -1 to its
sequence's width (no fill launch before); it writes the list's count with and without the
diagonal block (FlashAttention-4 reads the latter).

Also here, for the query-aware heads, in one launch: their pooled block map (the softmax
of mean query tile . key block mean over each tile's causal blocks) and the per-head
threshold of its coverage, found by bisection (no sort over the whole block map) by the
program that finishes the head's last row. Every kernel here serves all sparse sequences
of the batch in one launch; each reads its sequence's lengths and offsets from
``layout.plans.SparseSeqs.table``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_flexprefill.kernels.configs import interpreted, next_pow2
from vllm_flexprefill.kernels.launch import launcher
from vllm_flexprefill.layout.batch import BatchLayout
from vllm_flexprefill.layout.readers import sparse_seq
from vllm_flexprefill.layout.workspace import buffers


# the sequence table and the strides carry every length: one compilation serves every batch
@triton.jit(do_not_specialize=["stride_vh", "stride_ph", "stride_ih", "stride_ch"])
def block_lists_kernel(
    keep_v, keep_s, pooled, threshold, query_aware, table, slot, tile_seq, tile_row, tile_list, block_idx, block_cnt,
    off_diagonal, count_into, stride_vh, stride_ph, stride_ih, stride_ch,
    BS: tl.constexpr, DENSE: tl.constexpr, HAS_POOLED: tl.constexpr, BC: tl.constexpr, SLOTS: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    hq = tl.num_programs(1)
    s = tl.load(tile_seq + i_t)
    row = tl.load(tile_row + i_t)
    i_j = tl.load(slot + s)
    start = tl.load(tile_list + i_t)
    width = tl.load(tile_list + i_t + 1) - start  # its sequence's key blocks
    p_out = block_idx + i_h * stride_ih + start
    # a dense sequence (slot -1) keeps every causal block; so do a sparse one's probe rows.
    # A dense sequence reads row 0 of the table (which always has one) and ignores it.
    _, _, q_len, _, k_len, kb, p0 = sparse_seq(table, tl.maximum(i_j, 0))
    nb = (k_len + BS - 1) // BS
    i_r = row - (k_len - q_len) // BS
    all_causal = (i_j < 0) | (row >= (k_len - tl.minimum(q_len, BS)) // BS) | DENSE
    if HAS_POOLED:
        # a per-lane copy of the head's flag, so it combines with lane masks
        qa = (tl.zeros([BC], dtype=tl.int32) + tl.load(query_aware + s * hq + i_h).to(tl.int32)) != 0
        thr = tl.load(threshold + s * hq + i_h)
    n = 0
    for c0 in range(0, row + 1, BC):
        o_c = c0 + tl.arange(0, BC)
        m_c = o_c <= row
        if all_causal:
            sel = m_c
        else:
            b_v = tl.load(keep_v + i_h * stride_vh + kb + o_c, mask=m_c, other=0) != 0
            b_s = tl.load(keep_s + i_h * stride_vh + kb + (row - o_c), mask=m_c, other=0) != 0
            sel = (b_v | b_s) & m_c
            if HAS_POOLED:
                b_p = tl.load(pooled + i_h * stride_ph + p0 + i_r * nb + o_c, mask=m_c & qa, other=0.0)
                sel = sel | ((b_p >= thr) & m_c & qa)
        b_sel = sel.to(tl.int32)
        pos = n + tl.cumsum(b_sel, axis=0) - 1
        tl.store(p_out + pos, o_c.to(tl.int32), mask=sel)
        n += tl.sum(b_sel, axis=0)
    tl.store(block_cnt + i_h * stride_ch + i_t, n)
    tl.store(off_diagonal + i_h * stride_ch + i_t, n - 1)
    if SLOTS > 0:  # the call's computed blocks, spread over SLOTS counters
        tl.atomic_add(count_into + (i_t * hq + i_h) % SLOTS, n, sem="relaxed")
    for c0 in range(n, width, BC):
        o_c = c0 + tl.arange(0, BC)
        tl.store(p_out + o_c, tl.full([BC], -1, tl.int32), mask=o_c < width)


def write_block_lists(
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor,
    off_diagonal: torch.Tensor,
    layout: BatchLayout,
    keep_v: torch.Tensor | None = None,
    keep_s: torch.Tensor | None = None,
    query_aware: torch.Tensor | None = None,
    pooled: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    count_into: torch.Tensor | None = None,
) -> None:
    """Writes the lists of every tile of the batch, in one launch.

    Args:
        block_idx: [HQ, L] int32, every entry written: each tile's ids, then -1
            (``layout/lists.py``); block_cnt, off_diagonal: [HQ, NQB] int32 (contiguous), the
            count of each list with and without its diagonal block.
        keep_v, keep_s: [HQ, NBt] chosen verticals / slash offsets of the sparse sequences
            (``select_heads``); None: every sequence dense. Dense sequences, and a sparse
            one's probe rows (``patterns.masses.probe_row``), keep every causal block.
        query_aware: [N, HQ]; pooled: [HQ, Pt] pooled block maps (``pooled_map``), threshold:
            [N, HQ] (both ``pooled_map``); pooled None when no head may be query-aware.
        count_into: optional int32 counters [C] (contiguous) to which the lists' lengths add
            up (``backend.cost_routing.DensityMemory.counter``: the sum over the C counters
            grows by block_cnt.sum()).
    """
    hq, num_tiles = block_cnt.shape
    if num_tiles == 0:
        return
    seqs = layout.sparse_seqs()
    has_pooled = pooled is not None
    dummy = block_cnt
    launcher(block_lists_kernel)[(num_tiles, hq)](
        keep_v if keep_v is not None else dummy, keep_s if keep_s is not None else dummy,
        pooled if has_pooled else dummy, threshold if has_pooled else dummy,
        query_aware if has_pooled else dummy, seqs.table, seqs.slot,
        layout.tile_seq, layout.tile_row, layout.tile_list, block_idx, block_cnt, off_diagonal,
        count_into if count_into is not None else dummy,
        keep_v.stride(0) if keep_v is not None else 0, pooled.stride(0) if has_pooled else 0,
        block_idx.stride(0), block_cnt.stride(0),
        BS=layout.block_size, DENSE=keep_v is None, HAS_POOLED=has_pooled, BC=128,
        SLOTS=count_into.shape[0] if count_into is not None else 0, num_warps=4,
    )


@triton.jit
def _coverage_threshold(p_map, n, goal, out, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """Stores a threshold t whose entries >= t of the n-entry map carry at least ``goal`` of
    its mass, found by bisection in log2 space between 2^-126 (keep all) and 1 (keep the
    largest), so that no sort over the map is needed. The map was written by other programs:
    its loads skip L1 (``.cg``)."""
    lo = -126.0
    hi = 0.0
    for _ in range(ITERS):
        mid = 0.5 * (lo + hi)
        t = tl.exp2(mid)
        mass = 0.0
        for i0 in range(0, n, BLOCK):
            o = i0 + tl.arange(0, BLOCK)
            b_p = tl.load(p_map + o, mask=o < n, other=0.0, cache_modifier=".cg")
            mass += tl.sum(tl.where(b_p >= t, b_p, 0.0), axis=0)
        if mass >= goal:
            lo = mid
        else:
            hi = mid
    tl.store(out, tl.exp2(lo))


@triton.jit(do_not_specialize=["stride_ph"])
def pooled_map_kernel(
    q, k_bar, query_aware, table, pooled, threshold, done, scale, gamma, stride_qt, stride_qh, stride_ph,
    BS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, QR: tl.constexpr,
    ITERS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (tile row, head, sparse sequence): the row of the head's pooled map; the last
    of a head's rows to finish finds the head's coverage threshold over the whole map."""
    i_r = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_j = tl.program_id(2)
    hq = tl.num_programs(1)
    seq, q_start, q_len, _, k_len, kb, p0 = sparse_seq(table, i_j)
    nb = (k_len + BS - 1) // BS
    ctx = k_len - q_len
    first_row = ctx // BS
    rows = nb - first_row
    # the grid covers the longest sequence's tiles; only query-aware heads need a map
    if i_r >= rows:
        return
    if tl.load(query_aware + seq * hq + i_h) == 0:
        if i_r == 0:
            tl.store(threshold + seq * hq + i_h, 2.0)  # keeps nothing
        return
    row = first_row + i_r
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    # the tile's mean query, over its positions max(row * BS, ctx) .. min((row + 1) * BS, k_len),
    # QR rows at a time (a whole [BS, BD] float32 tile would hold 128 registers per thread)
    b_q = tl.zeros([BD], dtype=tl.float32)
    for i0 in tl.static_range(0, BS, QR):
        pos = row * BS + i0 + tl.arange(0, QR)
        m_t = (pos >= ctx) & (pos < k_len)
        b_t = tl.load(q + (q_start + pos - ctx)[:, None] * stride_qt + i_h * stride_qh + o_d[None, :],
                      mask=m_t[:, None] & m_d[None, :], other=0.0)
        b_q += tl.sum(b_t.to(tl.float32), axis=0)
    b_q = b_q / (tl.minimum((row + 1) * BS, k_len) - tl.maximum(row * BS, ctx)).to(tl.float32)
    p_k = k_bar + kb * ((hq // GROUP) * D) + (i_h // GROUP) * D + o_d[None, :]
    p_map = pooled + i_h * stride_ph + p0
    p_out = p_map + i_r * nb
    # pass 1: the row's maximum and sum of exponentials over its causal blocks
    run_m = float("-inf")
    run_s = 0.0
    for c0 in range(0, nb, BC):
        o_c = c0 + tl.arange(0, BC)
        m_c = o_c <= row
        b_k = tl.load(p_k + o_c[:, None] * ((hq // GROUP) * D), mask=m_c[:, None] & m_d[None, :], other=0.0)
        x = tl.where(m_c, scale * tl.sum(b_k * b_q[None, :], axis=1), float("-inf"))
        new_m = tl.maximum(run_m, tl.max(x, axis=0))
        run_s = run_s * tl.exp(run_m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
        run_m = new_m
    # pass 2: the probabilities, 0 above the diagonal
    for c0 in range(0, nb, BC):
        o_c = c0 + tl.arange(0, BC)
        m_c = o_c <= row
        b_k = tl.load(p_k + o_c[:, None] * ((hq // GROUP) * D), mask=m_c[:, None] & m_d[None, :], other=0.0)
        x = scale * tl.sum(b_k * b_q[None, :], axis=1)
        p = tl.where(m_c, tl.exp(x - run_m) / run_s, 0.0)
        tl.store(p_out + o_c, p, mask=o_c < nb)
    # every thread's stores before the count (bar.sync), published by its release; the program
    # that counts the head's last row acquires them all and thresholds the whole map
    tl.debug_barrier()
    before = tl.atomic_add(done + i_j * hq + i_h, 1, sem="acq_rel")
    if before == rows - 1:
        _coverage_threshold(p_map, rows * nb, gamma * rows.to(tl.float32), threshold + seq * hq + i_h, ITERS, BLOCK)
        # every row has counted: the count goes back to zero for the next launch (``layout/workspace.py``)
        tl.store(done + i_j * hq + i_h, 0)


def pooled_map(q: torch.Tensor, k_bar: torch.Tensor, query_aware: torch.Tensor, layout: BatchLayout,
               scale: float, gamma: float, iters: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``kernels.naive.naive_pooled_map``: the query-aware heads' pooled block
    maps and their coverage thresholds, every sparse sequence in one launch.

    A head's threshold t keeps the entries ``P >= t`` of its map, which carry at least
    ``gamma`` x its rows of mass (each row sums to 1); t is within a factor 2^(126 / 2^iters)
    of the largest such threshold. Heads that are not query-aware get t = 2 (keep nothing)
    and no map (left unwritten).

    Args:
        q: [Tq, HQ, D] packed as ``layout`` says, head_dim contiguous (each map row's mean
            query is taken here, for query-aware heads only); k_bar: [NBt, H, D] float32
            (``probe_stats``); query_aware: [N, HQ] (``select_heads``).
    Returns:
        pooled [HQ, Pt] float32: each sparse sequence's map, R rows of NB, at its ``p_start``;
        threshold [N, HQ] float32 (the rows of dense sequences are unspecified).
    """
    hq, d = q.shape[1], q.shape[2]
    if q.stride(-1) != 1:
        raise ValueError(f"q's head_dim must be contiguous, got strides {q.stride()}")
    h_kv = k_bar.shape[1]
    seqs = layout.sparse_seqs()
    ws, dev = buffers(layout), q.device
    out = ws.empty("pooled.map", (hq, seqs.pooled_size), torch.float32, dev)
    threshold = ws.empty("pooled.threshold", (layout.num_seqs, hq), torch.float32, dev)
    if seqs.seqs:
        # rows finished per (sparse sequence, head): the last one thresholds the map (and resets the count)
        done = ws.zeros("pooled.done", (len(seqs.seqs), hq), torch.int32, dev)
        launcher(pooled_map_kernel)[(seqs.max_rows, hq, len(seqs.seqs))](
            q, k_bar, query_aware, seqs.table, out, threshold, done, scale, gamma, q.stride(0), q.stride(1),
            out.stride(0), BS=layout.block_size, GROUP=hq // h_kv, D=d, BD=next_pow2(d), BC=64,
            QR=min(32, layout.block_size), ITERS=iters, BLOCK=1024 if not interpreted(q) else 256, num_warps=4)
    return out, threshold
