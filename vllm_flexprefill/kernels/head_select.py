"""Per-head block selection after the probe: two programs per (query head, sparse sequence).

From the probe statistics (``kernels/probe.py``) each program recovers the head's vertical
and slash masses and runs the Jensen-Shannon pattern test against the pooled estimate;
one then chooses the vertical blocks, the other the slash offsets that cover ``gamma`` of
their masses within the budget. It replaces about a hundred small PyTorch launches, whose
host cost dominated the estimation below 64k tokens.
Up to 1024 blocks (128k tokens at block size 128) the coverage choice sorts the masses in
registers; beyond, it bisects over order keys in fixed chunks. Either way one compilation
serves every length.

Twin: ``kernels/naive.py: naive_select_heads`` (same arguments and results).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_flexprefill.kernels.configs import next_pow2, select_config
from vllm_flexprefill.kernels.launch import launcher
from vllm_flexprefill.layout.batch import BatchLayout
from vllm_flexprefill.layout.readers import sparse_seq
from vllm_flexprefill.layout.workspace import buffers

# larger than every order key (a key is at most 0x7F800000 << 32 | 0x7FFFFFFF)
NO_KEY = tl.constexpr(0x7FFFFFFFFFFFFFFF)


@triton.jit
def _order_key(mass, o_c, forced_idx):
    """A unique int64 per entry, larger for earlier entries of the descending order: the
    forced entry first, then by mass (non-negative float bits order like the floats), ties
    broken towards the lower index, as a stable descending sort would."""
    bits = tl.where(o_c == forced_idx, float("inf"), mass).to(tl.int32, bitcast=True).to(tl.int64)
    return (bits << 32) | (0x7FFFFFFF - o_c).to(tl.int64)


@triton.jit
def _above(mass_ptr, nb, forced_idx, key, BV: tl.constexpr):
    """(mass of the entries whose order key exceeds ``key``, number of entries with order key >= ``key``)."""
    mass_sum = 0.0
    count = 0
    for c0 in range(0, nb, BV):
        o_c = c0 + tl.arange(0, BV)
        m_c = o_c < nb
        mass = tl.load(mass_ptr + o_c, mask=m_c, other=0.0)
        k = _order_key(mass, o_c, forced_idx)
        mass_sum += tl.sum(tl.where(m_c & (k > key), mass, 0.0), axis=0)
        count += tl.sum((m_c & (k >= key)).to(tl.int32), axis=0)
    return mass_sum, count


@triton.jit
def _cover_sorted(mass_ptr, keep_ptr, nb, forced_idx, gamma, min_count, max_count, BV: tl.constexpr):
    """``_cover`` for nb <= BV: the entries sit in registers, one sort finds the order.

    An entry is kept while the mass ranked before it is below gamma of the total; the kept
    entries are the ``count`` largest order keys.
    """
    o_c = tl.arange(0, BV)
    m_c = o_c < nb
    mass = tl.load(mass_ptr + o_c, mask=m_c, other=0.0)
    key = tl.where(m_c, _order_key(mass, o_c, forced_idx), -1)
    ranked = tl.sort(key, descending=True)
    # the mass of each ranked entry (the forced entry's key holds +inf, not its mass)
    bits = (ranked >> 32).to(tl.int32)
    forced_mass = tl.sum(tl.where(o_c == forced_idx, mass, 0.0), axis=0)
    ranked_mass = tl.where(ranked < 0, 0.0, tl.where(bits == 0x7F800000, forced_mass,
                                                     bits.to(tl.float32, bitcast=True)))
    before = tl.cumsum(ranked_mass, axis=0) - ranked_mass
    total = tl.sum(mass, axis=0)
    count = tl.sum(((before < gamma * total) & (ranked >= 0)).to(tl.int32), axis=0)
    count = tl.minimum(tl.maximum(count, min_count), tl.minimum(max_count, nb))
    # the count-th largest key
    last = tl.max(tl.where(o_c == count - 1, ranked, -1), axis=0)
    keep = (key >= last) & (count > 0) & m_c
    tl.store(keep_ptr + o_c, keep.to(tl.int8), mask=m_c)


@triton.jit
def _cover(mass_ptr, keep_ptr, nb, forced_idx, gamma, min_count, max_count, BV: tl.constexpr):
    """Marks the fewest entries (forced one first, then by descending mass) reaching gamma.

    Up to BV entries: one sort in registers (``_cover_sorted``), of BV / 4 entries when they
    fit (a bitonic sort of 256 keys does a sixth of the work of 1024: 32k keys at block size
    128 are 256 blocks). Beyond: sort-free, an entry is kept while the mass ranked before it
    is below gamma of the total; that mass only shrinks as the entry's order key grows, so
    the kept entries are those with key >= the smallest key whose preceding mass is below
    the goal, found by bisection over the keys. One compilation serves every block count.
    """
    if nb <= BV // 4:
        _cover_sorted(mass_ptr, keep_ptr, nb, forced_idx, gamma, min_count, max_count, BV // 4)
    elif nb <= BV:
        _cover_sorted(mass_ptr, keep_ptr, nb, forced_idx, gamma, min_count, max_count, BV)
    else:
        _cover_bisect(mass_ptr, keep_ptr, nb, forced_idx, gamma, min_count, max_count, BV)


@triton.jit
def _cover_bisect(mass_ptr, keep_ptr, nb, forced_idx, gamma, min_count, max_count, BV: tl.constexpr):
    """``_cover`` for any nb, by bisection over the order keys (chunks of BV entries)."""
    total, _count = _above(mass_ptr, nb, forced_idx, -1, BV)
    goal = gamma * total
    lo = tl.zeros([], dtype=tl.int64)
    hi = tl.full([], NO_KEY, dtype=tl.int64)
    for _step in range(63):
        mid = lo + (hi - lo) // 2
        before, _count = _above(mass_ptr, nb, forced_idx, mid, BV)
        go_down = before < goal
        hi = tl.where(go_down, mid, hi)
        lo = tl.where(go_down, lo, tl.minimum(mid + 1, hi))
    _mass, count = _above(mass_ptr, nb, forced_idx, lo, BV)
    count = tl.minimum(tl.maximum(count, min_count), tl.minimum(max_count, nb))
    # the count-th largest key: the largest key with at least `count` keys at or above it
    lo = tl.zeros([], dtype=tl.int64)
    hi = tl.full([], NO_KEY, dtype=tl.int64)
    for _step in range(63):
        mid = lo + (hi - lo) // 2 + ((hi - lo) & 1)
        _mass, at_or_above = _above(mass_ptr, nb, forced_idx, mid, BV)
        go_up = at_or_above >= count
        lo = tl.where(go_up, mid, lo)
        hi = tl.where(go_up, hi, tl.maximum(mid - 1, lo))
    for c0 in range(0, nb, BV):
        o_c = c0 + tl.arange(0, BV)
        m_c = o_c < nb
        mass = tl.load(mass_ptr + o_c, mask=m_c, other=0.0)
        keep = (_order_key(mass, o_c, forced_idx) >= lo) & (count > 0)
        tl.store(keep_ptr + o_c, keep.to(tl.int8), mask=m_c)


# the sequence table and the strides carry every length: one compilation serves every batch
@triton.jit(do_not_specialize=["min_blocks", "max_blocks", "stride_mh", "stride_sw", "stride_sh", "stride_vh"])
def head_select_kernel(
    m, l, k_bar, q_bar, table, scratch, keep_v, keep_s, query_aware,
    scale, gamma, tau, min_blocks, max_blocks,
    stride_mh, stride_mc, stride_kc, stride_kh, stride_qs, stride_qh, stride_sw, stride_sh, stride_vh,
    GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr,
    BV: tl.constexpr,
):
    # two programs per (head, sequence): both recover the masses and run the pattern test
    # (cheap passes), then one chooses the verticals and the other the slash offsets, so the
    # two coverage sorts, the longest steps, run side by side
    i_h = tl.program_id(0).to(tl.int64)
    i_j = tl.program_id(1)
    i_w = tl.program_id(2)
    hq = tl.num_programs(0)
    seq, _, q_len, _, k_len, kb, _ = sparse_seq(table, i_j)
    nb = (k_len + BS - 1) // BS
    n_probe = tl.minimum(q_len, BS)
    # the budgets: max_blocks 0 means every block; query-aware heads keep the floor
    max_blocks = tl.where(max_blocks > 0, max_blocks, nb)
    qa_blocks = tl.minimum(min_blocks, max_blocks)
    o_i = tl.arange(0, BS)
    m_i = o_i < n_probe
    p_m = m + i_h * stride_mh + kb * stride_mc
    p_l = l + i_h * stride_mh + kb * stride_mc
    k_bar += kb * stride_kc
    q_bar += i_j * stride_qs
    keep_v += kb
    keep_s += kb
    # scratch rows: vertical, slash part of the last probe block row, part of the row before, estimate
    p_v = scratch + i_w * stride_sw + i_h * stride_sh + 4 * kb
    p_p0 = p_v + nb
    p_p1 = p_v + 2 * nb
    p_e = p_v + 3 * nb

    # each probe row's log-sum-exp over all key blocks
    b_run = tl.full([BS], float("-inf"), dtype=tl.float32)
    b_sum = tl.zeros([BS], dtype=tl.float32)
    for c0 in range(0, nb, BC):
        o_c = c0 + tl.arange(0, BC)
        m_blk = (o_c < nb)[:, None] & m_i[None, :]
        b_mm = tl.load(p_m + o_c[:, None] * stride_mc + o_i[None, :], mask=m_blk, other=float("-inf"))
        b_ll = tl.load(p_l + o_c[:, None] * stride_mc + o_i[None, :], mask=m_blk, other=0.0)
        b_x = tl.where(b_ll > 0, b_mm + tl.log(tl.maximum(b_ll, 1e-30)), float("-inf"))
        b_new = tl.maximum(b_run, tl.max(b_x, axis=0))
        b_safe = tl.where(b_new == float("-inf"), 0.0, b_new)
        b_sum = b_sum * tl.exp(b_run - b_safe) + tl.sum(tl.exp(b_x - b_safe[None, :]), axis=0)
        b_run = b_new
    b_lse = tl.where(b_sum > 0, b_run + tl.log(tl.maximum(b_sum, 1e-30)), 0.0)

    # per key block: vertical mass, and the slash mass split by the probe row's block row
    last_row = (k_len - 1) // BS
    in_last = ((k_len - n_probe + o_i) // BS) == last_row
    o_d = tl.arange(0, BD)
    b_q = tl.load(q_bar + i_h * stride_qh + o_d, mask=o_d < D, other=0.0)
    for c0 in range(0, nb, BC):
        o_c = c0 + tl.arange(0, BC)
        m_c = o_c < nb
        m_blk = m_c[:, None] & m_i[None, :]
        b_mm = tl.load(p_m + o_c[:, None] * stride_mc + o_i[None, :], mask=m_blk, other=0.0)
        b_ll = tl.load(p_l + o_c[:, None] * stride_mc + o_i[None, :], mask=m_blk, other=0.0)
        b_w = tl.where(b_ll > 0, b_ll * tl.exp(b_mm - b_lse[None, :]), 0.0) / n_probe
        tl.store(p_v + o_c, tl.sum(b_w, axis=1), mask=m_c)
        tl.store(p_p0 + o_c, tl.sum(tl.where(in_last[None, :], b_w, 0.0), axis=1), mask=m_c)
        tl.store(p_p1 + o_c, tl.sum(tl.where(in_last[None, :], 0.0, b_w), axis=1), mask=m_c)
        # pooled estimate logits: scale * mean(q_probe) . mean_block(k)
        b_k = tl.load(k_bar + o_c[:, None] * stride_kc + (i_h // GROUP) * stride_kh + o_d[None, :],
                      mask=m_c[:, None] & (o_d < D)[None, :], other=0.0)
        tl.store(p_e + o_c, scale * tl.sum(b_k * b_q[None, :], axis=1), mask=m_c)
    tl.debug_barrier()

    # pattern test: Jensen-Shannon distance between the pooled estimate (softmax of the
    # logits row) and the vertical masses, over the blocks in chunks of BV; 0 * log 0 = 0
    l_max = float("-inf")
    for c0 in range(0, nb, BV):
        o_c = c0 + tl.arange(0, BV)
        l_max = tl.maximum(l_max, tl.max(tl.load(p_e + o_c, mask=o_c < nb, other=float("-inf")), axis=0))
    l_sum = 0.0
    for c0 in range(0, nb, BV):
        o_c = c0 + tl.arange(0, BV)
        l_sum += tl.sum(tl.exp(tl.load(p_e + o_c, mask=o_c < nb, other=float("-inf")) - l_max), axis=0)
    tiny = 1.1754943508222875e-38
    kl_e = 0.0
    kl_v = 0.0
    for c0 in range(0, nb, BV):
        o_c = c0 + tl.arange(0, BV)
        m_c = o_c < nb
        est = tl.exp(tl.load(p_e + o_c, mask=m_c, other=float("-inf")) - l_max) / l_sum
        vertical = tl.load(p_v + o_c, mask=m_c, other=0.0)
        log_mid = tl.log(tl.maximum(0.5 * (est + vertical), tiny))
        kl_e += tl.sum(tl.where(est > 0, est * (tl.log(tl.maximum(est, tiny)) - log_mid), 0.0), axis=0)
        kl_v += tl.sum(tl.where(vertical > 0, vertical * (tl.log(tl.maximum(vertical, tiny)) - log_mid), 0.0),
                       axis=0)
    js = tl.sqrt(tl.maximum(0.5 * (kl_e + kl_v), 0.0))
    qa = js < tau
    lo = tl.where(qa, qa_blocks, min_blocks)
    hi = tl.where(qa, qa_blocks, max_blocks)
    if i_w == 0:
        tl.store(query_aware + seq * hq + i_h, qa.to(tl.int8))
        _cover(p_v, keep_v + i_h * stride_vh, nb, 0, gamma, lo, hi, BV)
    else:
        tl.debug_barrier()
        # slash offset s: the last row's blocks at column last_row - s, the previous row's at
        # last_row - 1 - s; stored over the logits row, which the test above has consumed
        for c0 in range(0, nb, BV):
            o_c = c0 + tl.arange(0, BV)
            m_c = o_c < nb
            slash = tl.load(p_p0 + last_row - o_c, mask=m_c & (o_c <= last_row), other=0.0) \
                + tl.load(p_p1 + last_row - 1 - o_c, mask=m_c & (o_c <= last_row - 1), other=0.0)
            tl.store(p_e + o_c, slash, mask=m_c)
        tl.debug_barrier()
        _cover(p_e, keep_s + i_h * stride_vh, nb, 0, gamma, lo, hi, BV)


def select_heads(
    m: torch.Tensor, l: torch.Tensor, k_bar: torch.Tensor, q_probe_bar: torch.Tensor, layout: BatchLayout,
    scale: float, gamma: float, tau: float, min_blocks: int, max_blocks: int | None, chunk: int = 1024,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vertical/slash choice and pattern test of every head of every sparse sequence, in one launch.

    Args:
        m, l, k_bar, q_probe_bar: ``probe_stats`` of the batch ([HQ, NBt, BS], [NBt, H, D],
            [S, HQ, D]; ``layout.plans.SparseSeqs`` says where each sequence's part is).
        min_blocks, max_blocks: budget of vertical-slash heads (max None: every block); a
            query-aware head keeps the floor, min(min_blocks, max_blocks).
        chunk: blocks per step of the coverage choice (a power of two; in-register sort up to it).
        config: launch settings (BC, num_warps); default from kernels/configs.py.
    Returns:
        keep_v [HQ, NBt], keep_s [HQ, NBt] (chosen blocks / block offsets of each sequence
        at its offsets), query_aware [N, HQ] (0 for dense sequences): int8 flags (0/1),
        which the next kernels read as they are (no conversion launches).
    """
    hq, nbt, bs = m.shape
    h_kv, d = k_bar.shape[1], k_bar.shape[2]
    seqs = layout.sparse_seqs()
    ws, dev = buffers(layout), m.device
    scratch = ws.empty("select.scratch", (2, hq, 4 * nbt), torch.float32, dev)  # one per program of a head
    # every entry of a sparse sequence is written (the cover stores each of its flags): no fill
    keep_v = ws.empty("select.keep_v", (hq, nbt), torch.int8, dev)
    keep_s = ws.empty("select.keep_s", (hq, nbt), torch.int8, dev)
    # the rows of sparse sequences are written, those of dense ones stay zero
    query_aware = ws.zeros("select.query_aware", (layout.num_seqs, hq), torch.int8, dev)
    if not seqs.seqs:
        return keep_v, keep_s, query_aware
    launcher(head_select_kernel)[(hq, len(seqs.seqs), 2)](
        m, l, k_bar, q_probe_bar, seqs.table, scratch, keep_v, keep_s, query_aware,
        scale, gamma, tau, min_blocks, max_blocks or 0,
        m.stride(0), m.stride(1), k_bar.stride(0), k_bar.stride(1), q_probe_bar.stride(0), q_probe_bar.stride(1),
        scratch.stride(0), scratch.stride(1), keep_v.stride(0),
        GROUP=hq // h_kv, D=d, BD=next_pow2(d), BS=bs, BV=chunk, **(config or select_config(bs)),
    )
    return keep_v, keep_s, query_aware
