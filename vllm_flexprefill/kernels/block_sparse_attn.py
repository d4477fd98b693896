"""Block-sparse causal flash attention over per-(query head, query tile) key-block lists.

One program per (query head, query tile). A tile is up to BS queries of one sequence
(see ``layout/batch.py`` for the grid); it walks its sorted key-block list in
sub-tiles of BLOCK_N keys with an online softmax in float32. Only the diagonal block
(key block == tile row, always the list's last entry) needs the causal mask; it runs
after the loop, so the loop body has no mask and no branch.

Launch order: every head of the last tile, then every head of the tile before, and so on.
The last tiles have the longest rows (and the probe's tiles attend to every key), so the
heaviest programs start first instead of trailing the grid; heads that share a KV head run
side by side and read the same K/V tiles from L2.

Tiles that keep every causal block (the probe's rows) can be longer than the rest of the
grid together: with ``split`` (``BatchLayout.tail_split``) they run as segments of key
blocks, one program each in the same launch (normalised partial output and log-sum-exp;
the segments start first, beside the other tiles); the last of a tile's segments to
finish (an atomic count per tile and head) combines them into the tile's rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_flexprefill.kernels.configs import attention_config, interpreted, next_pow2, row_alignment, rows_aligned
from vllm_flexprefill.kernels.launch import launcher
from vllm_flexprefill.layout.plans import TailSplit
from vllm_flexprefill.layout.readers import segment
from vllm_flexprefill.layout.workspace import FRESH, Fresh


@triton.jit
def _attend(b_q, k, v, k_rows, k_start, key0, k_len, o_pos, o_d, m_d, b_m, b_l, b_acc, scale_log2,
            stride_kt, stride_kh, stride_vt, stride_vh, i_kh, row_pre, D: tl.constexpr, BD: tl.constexpr,
            BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PAGED: tl.constexpr,
            ROW_ALIGN: tl.constexpr, HAS_ROWS: tl.constexpr):
    """One sub-tile of BLOCK_N keys from position key0: the online-softmax update of the
    running maximum b_m, sum b_l and accumulator b_acc of the tile's queries.

    CAUSAL (the diagonal block) masks keys past the query and past k_len. Every other block
    of a list lies wholly before the tile's row, inside k_len: its loads need no mask (none
    at all when D is a power of two), and its scores are finite. HAS_ROWS: the keys' rows in
    the paged cache were read ahead (row_pre, [BLOCK_N])."""
    o_key = key0 + tl.arange(0, BLOCK_N)
    if PAGED:  # each key's row in the paged cache (k and v share strides)
        if HAS_ROWS:
            row_k = row_pre
        elif CAUSAL:
            row_k = tl.load(k_rows + k_start + o_key, mask=o_key < k_len, other=0)
        else:
            row_k = tl.load(k_rows + k_start + o_key)
        # vectorised K/V loads need the rows' alignment, which loaded offsets do not carry
        row_k = tl.multiple_of(row_k, ROW_ALIGN)
        row_v = row_k
    else:
        row_k = (k_start + o_key) * stride_kt
        row_v = (k_start + o_key) * stride_vt
    p_k = k + row_k[:, None] + i_kh * stride_kh + o_d[None, :]
    p_v = v + row_v[:, None] + i_kh * stride_vh + o_d[None, :]
    # [BLOCK_N, BD]
    if CAUSAL:
        m_kv = (o_key < k_len)[:, None] & m_d[None, :]
        b_k = tl.load(p_k, mask=m_kv, other=0.0)
        b_v = tl.load(p_v, mask=m_kv, other=0.0)
    elif D == BD:
        b_k = tl.load(p_k)
        b_v = tl.load(p_v)
    else:
        b_k = tl.load(p_k, mask=m_d[None, :], other=0.0)
        b_v = tl.load(p_v, mask=m_d[None, :], other=0.0)
    if UPCAST:
        b_k = b_k.to(tl.float32)
    # [BS, BLOCK_N] raw scores; the scale (log2 units) is applied inside the exponent's
    # argument, one fused multiply-add per score instead of a multiply and a subtraction
    # (the scale is positive: the row maximum of the scaled scores is the scaled maximum)
    b_s = tl.dot(b_q, tl.trans(b_k))
    if CAUSAL:
        b_s = tl.where(o_key[None, :] <= o_pos[:, None], b_s, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1) * scale_log2)
    if CAUSAL:
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    else:
        b_m_safe = b_m_new
    b_p = tl.exp2(b_s * scale_log2 - b_m_safe[:, None])
    b_alpha = tl.exp2(b_m - b_m_safe)
    b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
    b_p = b_p.to(v.dtype.element_ty)
    if UPCAST:
        b_p = b_p.to(tl.float32)
        b_v = b_v.to(tl.float32)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p, b_v)
    return b_m_new, b_l, b_acc


@triton.jit
def _tile(cu_seqlens_q, cu_seqlens_k, tile_seq, tile_row, i_t, BS: tl.constexpr):
    """Where query tile i_t sits: its block row, the absolute positions of its rows, which of
    them are the chunk's queries (rows before the chunk or past the end are idle), their rows
    in the packed queries, and the sequence's first key and key count."""
    i_s = tl.load(tile_seq + i_t)
    i_r = tl.load(tile_row + i_t).to(tl.int64)
    q_start = tl.load(cu_seqlens_q + i_s).to(tl.int64)
    q_len = tl.load(cu_seqlens_q + i_s + 1) - q_start
    k_start = tl.load(cu_seqlens_k + i_s).to(tl.int64)
    k_len = tl.load(cu_seqlens_k + i_s + 1) - k_start
    ctx = k_len - q_len
    o_pos = i_r * BS + tl.arange(0, BS)
    m_row = (o_pos >= ctx) & (o_pos < k_len)
    o_q = q_start + o_pos - ctx
    return i_r, o_pos, m_row, o_q, k_start, k_len


@triton.jit
def _tile_start(q, o_q, m_row, i_h, stride_qt, stride_qh, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
                UPCAST: tl.constexpr):
    """The tile's head-dim offsets and mask, its [BS, BD] queries of head i_h (zeros on idle
    rows), and the empty online-softmax state: running maximum, sum and accumulator."""
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_q = tl.load(q + o_q[:, None] * stride_qt + i_h * stride_qh + o_d[None, :],
                  mask=m_row[:, None] & m_d[None, :], other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)
    b_m = tl.full([BS], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BS], dtype=tl.float32)
    b_acc = tl.zeros([BS, BD], dtype=tl.float32)
    return o_d, m_d, b_q, b_m, b_l, b_acc


@triton.jit
def _attend_block(b_q, k, v, k_rows, k_start, i_c, k_len, o_pos, o_d, m_d, b_m, b_l, b_acc, scale_log2,
                  stride_kt, stride_kh, stride_vt, stride_vh, i_kh, row_pre, D: tl.constexpr, BD: tl.constexpr,
                  BS: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                  PAGED: tl.constexpr, ROW_ALIGN: tl.constexpr, HAS_ROWS: tl.constexpr):
    """Key block i_c in sub-tiles of BLOCK_N keys (``_attend``); CAUSAL for the diagonal block.
    HAS_ROWS (only where BLOCK_N == BS, one sub-tile): the block's rows read ahead, row_pre."""
    for i_n in tl.static_range(BS // BLOCK_N):
        b_m, b_l, b_acc = _attend(b_q, k, v, k_rows, k_start, i_c * BS + i_n * BLOCK_N, k_len, o_pos, o_d, m_d,
                                  b_m, b_l, b_acc, scale_log2, stride_kt, stride_kh, stride_vt, stride_vh, i_kh,
                                  row_pre, D, BD, BLOCK_N, CAUSAL, UPCAST, PAGED, ROW_ALIGN, HAS_ROWS)
    return b_m, b_l, b_acc


@triton.jit
def _rows_ahead(k_rows, k_start, i_c, valid, BS: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """The paged-cache rows of key block i_c's BS keys ([BS] int64; zeros where not valid)."""
    o_key = tl.arange(0, BS)
    rows = tl.load(k_rows + k_start + i_c * BS + o_key, mask=o_key < tl.where(valid, BS, 0), other=0)
    return tl.multiple_of(rows, ROW_ALIGN)


@triton.jit
def _list_tile(q, k, v, k_rows, o, lse, cu_seqlens_q, cu_seqlens_k, tile_seq, tile_row, block_idx, block_cnt,
               i_h, i_t, scale_log2, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot,
               stride_oh, stride_ih, tile_list, stride_ch, stride_lh,
               GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_LSE: tl.constexpr, UPCAST: tl.constexpr, PAGED: tl.constexpr, ROW_ALIGN: tl.constexpr,
               ROWS_AHEAD: tl.constexpr):
    """Query tile i_t of head i_h over the key blocks of its list, into its output rows."""
    i_kh = i_h // GROUP
    i_r, o_pos, m_row, o_q, k_start, k_len = _tile(cu_seqlens_q, cu_seqlens_k, tile_seq, tile_row, i_t, BS)
    o_d, m_d, b_q, b_m, b_l, b_acc = _tile_start(q, o_q, m_row, i_h, stride_qt, stride_qh, D, BD, BS, UPCAST)
    p_idx = block_idx + i_h * stride_ih + tl.load(tile_list + i_t)
    n_blocks = tl.load(block_cnt + i_h * stride_ch + i_t)
    # the list is sorted and always ends with the diagonal block (key block == tile row):
    # every block before it is wholly visible, so the loop needs no causal mask
    last = tl.maximum(n_blocks - 1, 0)
    r_c = o_pos  # unused placeholder without ROWS_AHEAD
    if ROWS_AHEAD:
        # on a paged cache the block ids are read two blocks ahead and the keys' rows one
        # block ahead: K/V addresses that wait on loads of the same iteration stall the loads'
        # pipeline. With addresses computed from the id (packed keys with sub-tiles or unequal
        # K/V strides; others go through row offsets) the same scheme is slower: there the
        # id is read in place
        i_c = tl.load(p_idx).to(tl.int64)
        i_n = tl.load(p_idx + tl.minimum(1, last)).to(tl.int64)
        r_c = _rows_ahead(k_rows, k_start, i_c, last > 0, BS, ROW_ALIGN)
        for i_b in range(last):
            i_nn = tl.load(p_idx + tl.minimum(i_b + 2, last)).to(tl.int64)
            # the next block's rows, unless it is the diagonal (its keys may pass k_len)
            r_n = _rows_ahead(k_rows, k_start, i_n, i_b + 1 < last, BS, ROW_ALIGN)
            b_m, b_l, b_acc = _attend_block(b_q, k, v, k_rows, k_start, i_c, k_len, o_pos, o_d, m_d, b_m, b_l,
                                            b_acc, scale_log2, stride_kt, stride_kh, stride_vt, stride_vh, i_kh, r_c,
                                            D, BD, BS, BLOCK_N, False, UPCAST, PAGED, ROW_ALIGN, True)
            i_c, i_n, r_c = i_n, i_nn, r_n
    else:
        for i_b in range(last):
            i_c = tl.load(p_idx + i_b).to(tl.int64)
            b_m, b_l, b_acc = _attend_block(b_q, k, v, k_rows, k_start, i_c, k_len, o_pos, o_d, m_d, b_m, b_l,
                                            b_acc, scale_log2, stride_kt, stride_kh, stride_vt, stride_vh, i_kh, r_c,
                                            D, BD, BS, BLOCK_N, False, UPCAST, PAGED, ROW_ALIGN, False)
    if n_blocks > 0:
        b_m, b_l, b_acc = _attend_block(b_q, k, v, k_rows, k_start, i_r, k_len, o_pos, o_d, m_d, b_m, b_l, b_acc,
                                        scale_log2, stride_kt, stride_kh, stride_vt, stride_vh, i_kh, r_c, D, BD, BS,
                                        BLOCK_N, True, UPCAST, PAGED, ROW_ALIGN, False)
    b_o = b_acc / tl.where(b_l == 0.0, 1.0, b_l)[:, None]
    tl.store(o + o_q[:, None] * stride_ot + i_h * stride_oh + o_d[None, :],
             b_o.to(o.dtype.element_ty), mask=m_row[:, None] & m_d[None, :])
    if HAS_LSE:
        # natural-log log-sum-exp of each query row, for merging partial attentions
        b_lse = (b_m + tl.log2(b_l)) * 0.6931471805599453
        tl.store(lse + i_h * stride_lh + o_q, b_lse, mask=m_row)


@triton.jit
def _segment(q, k, v, k_rows, o_part, lse_part, cu_seqlens_q, cu_seqlens_k, tile_seq, tile_row, segments,
             num_segments, i_h, i_g, hq, scale_log2, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
             GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
             UPCAST: tl.constexpr, PAGED: tl.constexpr, ROW_ALIGN: tl.constexpr, ROWS_AHEAD: tl.constexpr):
    """Segment i_g (key blocks b0 .. b1 - 1) of a tile that keeps every causal block: the
    tile's attention over those keys alone, normalised, with its log-sum-exp.

    o_part: [NS, BS, HQ, D] float32; lse_part: [NS, HQ, BS] float32 (natural log)."""
    i_t, b0, b1, _ = segment(segments, num_segments, i_g)
    i_kh = i_h // GROUP
    i_r, o_pos, m_row, o_q, k_start, k_len = _tile(cu_seqlens_q, cu_seqlens_k, tile_seq, tile_row, i_t, BS)
    o_row = tl.arange(0, BS)
    o_d, m_d, b_q, b_m, b_l, b_acc = _tile_start(q, o_q, m_row, i_h, stride_qt, stride_qh, D, BD, BS, UPCAST)
    # blocks before the diagonal are wholly visible; the diagonal (block i_r) ends the last segment
    # (ROWS_AHEAD: each block's paged rows read one block ahead, as in _list_tile)
    c1 = tl.minimum(b1, i_r)
    r_c = o_pos  # unused placeholder without ROWS_AHEAD
    if ROWS_AHEAD:
        r_c = _rows_ahead(k_rows, k_start, b0, b0 < c1, BS, ROW_ALIGN)
    for i_c in range(b0, c1):
        r_n = r_c
        if ROWS_AHEAD:
            r_n = _rows_ahead(k_rows, k_start, i_c + 1, i_c + 1 < c1, BS, ROW_ALIGN)
        b_m, b_l, b_acc = _attend_block(b_q, k, v, k_rows, k_start, i_c, k_len, o_pos, o_d, m_d, b_m, b_l, b_acc,
                                        scale_log2, stride_kt, stride_kh, stride_vt, stride_vh, i_kh, r_c, D, BD, BS,
                                        BLOCK_N, False, UPCAST, PAGED, ROW_ALIGN, ROWS_AHEAD)
        r_c = r_n
    if b1 > i_r:
        b_m, b_l, b_acc = _attend_block(b_q, k, v, k_rows, k_start, i_r, k_len, o_pos, o_d, m_d, b_m, b_l, b_acc,
                                        scale_log2, stride_kt, stride_kh, stride_vt, stride_vh, i_kh, r_c, D, BD, BS,
                                        BLOCK_N, True, UPCAST, PAGED, ROW_ALIGN, False)
    b_o = b_acc / tl.where(b_l == 0.0, 1.0, b_l)[:, None]
    tl.store(o_part + ((i_g * BS + o_row[:, None]) * hq + i_h) * D + o_d[None, :], b_o, mask=m_d[None, :])
    b_lse = tl.where(b_l > 0.0, (b_m + tl.log2(tl.where(b_l > 0.0, b_l, 1.0))) * 0.6931471805599453,
                     float("-inf"))
    tl.store(lse_part + (i_g * hq + i_h) * BS + o_row, b_lse)


@triton.jit
def _merge(o_part, lse_part, o, lse, cu_seqlens_q, cu_seqlens_k, tile_seq, tile_row, i_t, g0, g1, i_h, hq,
           stride_ot, stride_oh, stride_lh, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
           HAS_LSE: tl.constexpr):
    """The segments g0 .. g1 - 1 of cut tile i_t, combined by their log-sum-exps into its
    output rows. Other programs wrote them: the loads skip L1 (``.cg``)."""
    _i_r, _o_pos, m_row, o_q, _k_start, _k_len = _tile(cu_seqlens_q, cu_seqlens_k, tile_seq, tile_row, i_t, BS)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_row = tl.arange(0, BS)
    b_m = tl.full([BS], float("-inf"), dtype=tl.float32)
    for i_g in range(g0, g1):
        b_m = tl.maximum(b_m, tl.load(lse_part + (i_g * hq + i_h) * BS + o_row, cache_modifier=".cg"))
    b_safe = tl.where(b_m == float("-inf"), 0.0, b_m)
    b_w = tl.zeros([BS], dtype=tl.float32)
    b_acc = tl.zeros([BS, BD], dtype=tl.float32)
    for i_g in range(g0, g1):
        w = tl.exp(tl.load(lse_part + (i_g * hq + i_h) * BS + o_row, cache_modifier=".cg") - b_safe)
        part = tl.load(o_part + ((i_g * BS + o_row[:, None]) * hq + i_h) * D + o_d[None, :], mask=m_d[None, :],
                       other=0.0, cache_modifier=".cg")
        b_w += w
        b_acc += w[:, None] * part
    b_o = b_acc / tl.where(b_w == 0.0, 1.0, b_w)[:, None]
    tl.store(o + o_q[:, None] * stride_ot + i_h * stride_oh + o_d[None, :], b_o.to(o.dtype.element_ty),
             mask=m_row[:, None] & m_d[None, :])
    if HAS_LSE:
        tl.store(lse + i_h * stride_lh + o_q, b_safe + tl.log(tl.where(b_w == 0.0, 1.0, b_w)), mask=m_row)


# lengths, and the strides that follow them, vary per call: not specialised on, so one compilation
# serves every prompt (a new variant would compile in the middle of serving)
@triton.jit(do_not_specialize=["num_tiles", "num_segments", "stride_ih", "stride_ch", "stride_lh"])
def block_sparse_attn_fwd_kernel(
    q, k, v, k_rows, o, lse, o_part, lse_part,
    cu_seqlens_q, cu_seqlens_k, tile_seq, tile_row, block_idx, block_cnt, tile_ids, segments,
    split_tiles, seg_first, seg_done, num_tiles, num_segments, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_ih, tile_list, stride_ch, stride_lh,
    GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LSE: tl.constexpr, UPCAST: tl.constexpr, PAGED: tl.constexpr, ROW_ALIGN: tl.constexpr,
    INDIRECT: tl.constexpr, ROWS_AHEAD: tl.constexpr,
):
    """Programs [0, num_segments) run the segments of the tiles cut into segments (about
    equally long, and the longest work of the grid: first), and the last segment of a tile
    to finish merges them all; the others run one tile each over its list, the last tile
    first (the longest lists), or the tiles ``tile_ids`` in that order (INDIRECT: the tiles
    that are not cut)."""
    i_h = tl.program_id(0).to(tl.int64)
    i_p = tl.program_id(1)
    hq = tl.num_programs(0)
    if i_p < num_segments:
        i_g = i_p.to(tl.int64)
        _segment(q, k, v, k_rows, o_part, lse_part, cu_seqlens_q, cu_seqlens_k, tile_seq, tile_row, segments,
                 num_segments, i_h, i_g, hq, scale_log2, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                 stride_vh, GROUP, D, BD, BS, BLOCK_N, UPCAST, PAGED, ROW_ALIGN, ROWS_AHEAD)
        # every thread's stores of this part before the count (bar.sync), published by its
        # release; the program that counts the tile's last segment acquires them all and merges
        tl.debug_barrier()
        i_j = segment(segments, num_segments, i_g)[3].to(tl.int64)
        g0 = tl.load(seg_first + i_j)
        g1 = tl.load(seg_first + i_j + 1)
        before = tl.atomic_add(seg_done + i_j * hq + i_h, 1, sem="acq_rel")
        if before == g1 - g0 - 1:
            _merge(o_part, lse_part, o, lse, cu_seqlens_q, cu_seqlens_k, tile_seq, tile_row,
                   tl.load(split_tiles + i_j).to(tl.int64), g0, g1, i_h, hq, stride_ot, stride_oh, stride_lh,
                   D, BD, BS, HAS_LSE)
            # every segment has counted: back to zero for the next launch (``layout/workspace.py``)
            tl.store(seg_done + i_j * hq + i_h, 0)
    else:
        i_p -= num_segments
        if INDIRECT:
            i_t = tl.load(tile_ids + i_p).to(tl.int64)
        else:
            i_t = (num_tiles - 1 - i_p).to(tl.int64)
        _list_tile(q, k, v, k_rows, o, lse, cu_seqlens_q, cu_seqlens_k, tile_seq, tile_row, block_idx, block_cnt,
                   i_h, i_t, scale_log2, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot,
                   stride_oh, stride_ih, tile_list, stride_ch, stride_lh, GROUP, D, BD, BS, BLOCK_N, HAS_LSE,
                   UPCAST, PAGED, ROW_ALIGN, ROWS_AHEAD)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    tile_seq: torch.Tensor,
    tile_row: torch.Tensor,
    tile_list: torch.Tensor,
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor,
    block_size: int,
    scale: float,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
    k_rows: torch.Tensor | None = None,
    split: TailSplit | None = None,
    workspace: Fresh = FRESH,
) -> torch.Tensor:
    """Triton twin of ``kernels.naive.naive_block_sparse_attention``.

    Args:
        q: [Tq, HQ, D]; k, v: [Tk, H, D] (strided, last dim contiguous), bf16 or fp16; or,
            with ``k_rows``, views of a paged cache [..., H, D] with the same strides.
        k_rows: optional [Tk] int64: where each key position's row starts in k and v, in
            elements (``layout.paged.paged_rows``); the kernel reads the pages in place.
            Packed k and v with equal strides are read through such offsets as well.
            Each offset must be a sum of multiples of k's strides (as paged_rows makes them):
            the kernel reads rows with the alignment those strides give.
        cu_seqlens_q, cu_seqlens_k: [N + 1] int32; tile_seq, tile_row: [NQB] int32; tile_list:
            [NQB + 1] int32 (``BatchLayout.grid``).
        block_idx: [HQ, L] int32 sorted key-block lists laid out as tile_list says, each
            ending with the tile's diagonal block (its row); block_cnt: [HQ, NQB] int32, at
            least 1 (``layout/lists.py``).
        out: optional [Tq, HQ, D] buffer written in place.
        lse: optional [HQ, Tq] float32 buffer that receives each row's log-sum-exp.
        config: launch settings (BLOCK_N, num_warps, num_stages); default from kernels/configs.py.
        split: ``BatchLayout.tail_split``: tiles whose lists hold every causal block, run in
            segments of key blocks (programs of their own) and merged; their lists are not read.
        workspace: where the segments' partial results and counters come from
            (``layout/workspace.py``; by default allocated for this call).
    Returns:
        out, [Tq, HQ, D] in q's dtype.
    """
    t_q, hq, d = q.shape
    h_kv = k.shape[-2]
    if k_rows is not None and (k.stride() != v.stride() or k.stride(-1) != 1):
        raise ValueError(f"paged k and v must have the same strides, head_dim contiguous; got {k.stride()} "
                         f"and {v.stride()}")
    if out is None:
        out = torch.empty(t_q, hq, v.shape[-1], dtype=q.dtype, device=q.device)
    num_tiles = tile_seq.shape[0]
    if num_tiles == 0:
        return out
    cfg = config or attention_config(d, block_size)
    one_sub_tile = cfg["BLOCK_N"] == block_size  # where a block's rows can be read a block ahead
    if k_rows is None and one_sub_tile and k.stride() == v.stride() and k.stride(-1) == 1 and rows_aligned(k):
        # packed keys go through their row offsets too: the paged path reads each block's rows
        # a block ahead, which is faster than the packed path's addresses computed in the
        # iteration. Only with strides the offsets' declared alignment covers
        # (``rows_aligned``): without it the loads go element by element
        k_rows = torch.arange(0, k.shape[0] * k.stride(0), k.stride(0), dtype=torch.int64, device=k.device)
    common = dict(GROUP=hq // h_kv, D=d, BD=next_pow2(d), BS=block_size, UPCAST=interpreted(q),
                  PAGED=k_rows is not None, ROW_ALIGN=row_alignment(k, k_rows))
    rows = k_rows if k_rows is not None else cu_seqlens_k
    main_tiles = num_tiles if split is None else split.main_tiles.shape[0]
    n_seg = 0 if split is None else split.segments.shape[1]
    o_part = lse_part = seg_done = out  # unused without segments
    if n_seg:
        o_part = workspace.empty("attend.o_part", (n_seg, block_size, hq, d), torch.float32, q.device)
        lse_part = workspace.empty("attend.lse_part", (n_seg, hq, block_size), torch.float32, q.device)
        # segments finished per (cut tile, head): the last one merges the tile (and resets the count)
        seg_done = workspace.zeros("attend.seg_done", (split.split_tiles.shape[0], hq), torch.int32, q.device)
    # one launch: the segments and the other tiles side by side
    # (grid dimension 1 allows 65535 programs: 8M keys of one group at BS 128)
    launcher(block_sparse_attn_fwd_kernel)[(hq, n_seg + main_tiles)](
        q, k, v, rows, out, lse if lse is not None else out, o_part, lse_part,
        cu_seqlens_q, cu_seqlens_k, tile_seq, tile_row, block_idx, block_cnt,
        split.main_tiles if split is not None else tile_seq, split.segments if split is not None else tile_seq,
        split.split_tiles if split is not None else tile_seq, split.seg_first if split is not None else tile_seq,
        seg_done, num_tiles, n_seg, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k.stride(0), k.stride(-2), v.stride(0), v.stride(-2), out.stride(0),
        out.stride(1), block_idx.stride(0), tile_list, block_cnt.stride(0),
        lse.stride(0) if lse is not None else 0,
        HAS_LSE=lse is not None, INDIRECT=split is not None,
        ROWS_AHEAD=k_rows is not None and one_sub_tile, **common, **cfg,
    )
    return out
