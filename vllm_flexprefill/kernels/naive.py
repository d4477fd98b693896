"""Plain-PyTorch twins of the Triton kernels: float32, readable, slow. They are the spec."""

from __future__ import annotations

import torch

from vllm_flexprefill.layout.batch import BatchLayout
from vllm_flexprefill.layout.lists import mask_to_lists
from vllm_flexprefill.layout.paged import rows_of
from vllm_flexprefill.patterns.coverage import coverage_select, js_distance
from vllm_flexprefill.patterns.masses import block_means, probe_masses, probe_row


def naive_block_sparse_attention(
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
    split=None,
    workspace=None,
) -> torch.Tensor:
    """Twin of ``kernels.block_sparse_attn.block_sparse_attention`` (same arguments): causal
    attention restricted to the listed key blocks of every (query head, tile).

    Args:
        q: [Tq, HQ, D]; k, v: [Tk, H, D] packed as cu_seqlens_k says, or views of a paged
            cache with ``k_rows`` [Tk] (``paged_rows``) saying where each key position is.
        cu_seqlens_q, cu_seqlens_k: [N + 1]; tile_seq, tile_row: [NQB]; tile_list: [NQB + 1]
            (``BatchLayout.grid``).
        block_idx: [HQ, L] int32 sorted key-block lists (``layout/lists.py``); block_cnt: [HQ, NQB].
        out: optional [Tq, HQ, D] written in place; lse: optional [HQ, Tq] float32 that
            receives each row's natural-log log-sum-exp.
        config, split, workspace: the kernel's launch settings; every tile is computed whole
            here, which gives the same result.
    Returns:
        out, [Tq, HQ, D] in q's dtype.
    """
    if k_rows is not None:
        k, v = rows_of(k, k_rows), rows_of(v, k_rows)
    bs = block_size
    hq, group = q.shape[1], q.shape[1] // k.shape[1]
    if out is None:
        out = torch.empty(q.shape[0], hq, v.shape[2], dtype=q.dtype, device=q.device)
    q_starts, k_starts = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    seq_of_tile = tile_seq.tolist()
    for s in range(len(q_starts) - 1):
        q_len, k_len = q_starts[s + 1] - q_starts[s], k_starts[s + 1] - k_starts[s]
        tiles = [t for t, x in enumerate(seq_of_tile) if x == s]
        if not tiles:
            continue
        lo, hi = tiles[0], tiles[-1] + 1
        first_row = int(tile_row[lo])
        nb = -(-k_len // bs)
        q_pos = torch.arange(k_len - q_len, k_len, device=q.device)
        k_pos = torch.arange(k_len, device=q.device)
        # [HQ, R, NB] -> [HQ, q_len, k_len] token mask
        tile_mask = torch.zeros(hq, hi - lo, nb + 1, dtype=torch.bool, device=q.device)
        start = int(tile_list[lo])
        ids = block_idx[:, start:start + (hi - lo) * nb].view(hq, hi - lo, nb).long()
        in_list = torch.arange(nb, device=q.device) < block_cnt[:, lo:hi, None]
        tile_mask.scatter_(-1, torch.where(in_list & (ids >= 0) & (ids < nb), ids, nb), True)
        tile_of_query = q_pos // bs - first_row
        token_mask = tile_mask[:, tile_of_query][:, :, k_pos // bs]
        token_mask &= k_pos[None, None, :] <= q_pos[None, :, None]
        rows, keys = slice(q_starts[s], q_starts[s + 1]), slice(k_starts[s], k_starts[s + 1])
        qs = q[rows].float().transpose(0, 1)
        ks = k[keys].float().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[keys].float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (scale * qs @ ks.transpose(1, 2)).masked_fill(~token_mask, float("-inf"))
        out[rows] = (torch.softmax(scores, dim=-1) @ vs).transpose(0, 1).to(out.dtype)
        if lse is not None:
            lse[:, rows] = torch.logsumexp(scores, dim=-1)
    return out


def naive_probe_stats(
    q: torch.Tensor, k: torch.Tensor, layout: BatchLayout, scale: float, k_rows: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Twin of ``kernels.probe.probe_stats`` (same arguments; ``config``, the launch
    settings, has no effect here): ``probe_one`` of each sparse sequence, laid end to end
    (``layout.plans.SparseSeqs``).

    Args:
        q: [Tq, HQ, D], k: [Tk, H, D] packed as ``layout`` says (or a paged cache view, with
            ``k_rows`` [Tk]).
    Returns:
        m, l [HQ, NBt, BS], k_bar [NBt, H, D], q_probe_bar [S, HQ, D].
    """
    parts = [probe_one(q[layout.q_range(s)], k[layout.k_range(s)] if k_rows is None else k, layout.block_size, scale,
                       None if k_rows is None else k_rows[layout.k_range(s)])
             for s in layout.sparse_seqs().seqs]
    hq, d = q.shape[1], q.shape[2]
    if not parts:
        empty = torch.empty(hq, 0, layout.block_size, device=q.device)
        return empty, empty, torch.empty(0, k.shape[-2], d, device=q.device), torch.empty(0, hq, d, device=q.device)
    m, l, k_bar, q_probe_bar = zip(*parts)
    return torch.cat(m, 1), torch.cat(l, 1), torch.cat(k_bar), torch.stack(q_probe_bar)


def probe_one(
    q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float, k_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probe statistics and block means of one sequence (the probe: its last NP = min(BS, q_len) queries).

    Args:
        q: [q_len, HQ, D] the sequence's queries (the last q_len of the k_len positions).
        k: [k_len, H, D] all keys of the sequence (or a paged cache view, with ``k_rows``).
        k_rows: optional [k_len] int64 rows of the keys in k (``paged_rows``).
    Returns:
        m, l: [HQ, NB, BS] float32. ``m[h, c, i]`` is the largest causal score of probe row
            i in key block c (-inf if none), ``l[h, c, i]`` the sum of ``exp(score - m)``.
            Rows i >= NP are padding (m = -inf, l = 0).
        k_bar: [NB, H, D] float32 key block means.
        q_probe_bar: [HQ, D] float32 mean of the probe queries.
    """
    if k_rows is not None:
        k = rows_of(k, k_rows)
    q_len, hq, _ = q.shape
    k_len, group = k.shape[0], hq // k.shape[1]
    n_probe = min(block_size, q_len)
    q_probe = q[q_len - n_probe:]
    nb = -(-k_len // block_size)
    probe_pos = torch.arange(k_len - n_probe, k_len, device=k.device)
    key_pos = torch.arange(nb * block_size, device=k.device)
    keys = torch.zeros(nb * block_size, hq, k.shape[2], device=k.device)
    keys[:k_len] = k.float().repeat_interleave(group, dim=1)
    scores = scale * torch.einsum("ihd,jhd->hij", q_probe.float(), keys)
    scores = scores.masked_fill((key_pos[None, :] > probe_pos[:, None]) | (key_pos[None, :] >= k_len), float("-inf"))
    scores = scores.view(hq, n_probe, nb, block_size).transpose(1, 2)  # [HQ, NB, NP, BS]
    m = scores.amax(-1)
    l = torch.exp(scores - torch.where(torch.isinf(m), 0.0, m)[..., None]).sum(-1)
    pad = block_size - n_probe
    m = torch.nn.functional.pad(m, (0, pad), value=float("-inf"))
    l = torch.nn.functional.pad(l, (0, pad), value=0.0)
    return m, l, block_means(k, block_size), q_probe.float().mean(0)


def naive_select_heads(
    m: torch.Tensor, l: torch.Tensor, k_bar: torch.Tensor, q_probe_bar: torch.Tensor, layout: BatchLayout,
    scale: float, gamma: float, tau: float, min_blocks: int, max_blocks: int | None, chunk: int = 1024,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Twin of ``kernels.head_select.select_heads`` (same arguments; ``chunk`` and ``config``
    shape the kernel's passes, not its result): ``select_one`` of each sparse sequence,
    laid end to end; returns keep_v, keep_s [HQ, NBt] bool and query_aware [N, HQ] bool."""
    hq, nbt, bs = m.shape
    seqs = layout.sparse_seqs()
    keep_v = torch.zeros(hq, nbt, dtype=torch.bool, device=m.device)
    keep_s = torch.zeros_like(keep_v)
    query_aware = torch.zeros(layout.num_seqs, hq, dtype=torch.bool, device=m.device)
    for j, s in enumerate(seqs.seqs):
        nb = layout.num_key_blocks(s)
        blocks = slice(seqs.kb_start[j], seqs.kb_start[j] + nb)
        most = max_blocks or nb
        keep_v[:, blocks], keep_s[:, blocks], query_aware[s] = select_one(
            m[:, blocks], l[:, blocks], k_bar[blocks], q_probe_bar[j], min(bs, layout.q_lens[s]), layout.k_lens[s],
            scale, gamma, tau, min_blocks, most, min(min_blocks, most))
    return keep_v, keep_s, query_aware


def select_one(
    m: torch.Tensor, l: torch.Tensor, k_bar: torch.Tensor, q_probe_bar: torch.Tensor, n_probe: int,
    k_len: int, scale: float, gamma: float, tau: float, min_blocks: int, max_blocks: int, qa_blocks: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vertical/slash choice and pattern test of every head of one sequence.

    Args:
        m, l: [HQ, NB, BS] probe statistics; k_bar: [NB, H, D] float32 key block means;
        q_probe_bar: [HQ, D] float32 mean of the probe queries.
        min_blocks, max_blocks: budget of vertical-slash heads; qa_blocks: of query-aware heads.
    Returns:
        keep_v [HQ, NB] bool, keep_s [HQ, NB] bool (chosen block offsets), query_aware [HQ] bool.
    """
    hq, nb, bs = m.shape
    vertical, slash = probe_masses(m, l, n_probe, k_len, bs)
    keys = k_bar.repeat_interleave(hq // k_bar.shape[1], dim=1)
    estimate = torch.softmax(scale * torch.einsum("hd,chd->hc", q_probe_bar, keys), dim=-1)
    query_aware = js_distance(estimate, vertical) < tau  # [HQ]
    min_count = torch.where(query_aware, qa_blocks, min_blocks)
    max_count = torch.where(query_aware, qa_blocks, max_blocks)
    # verticals and slashes in one call: [2, HQ, NB]
    valid = torch.ones(2, hq, nb, dtype=torch.bool, device=m.device)
    forced = (torch.arange(nb, device=m.device) == 0).expand(2, hq, nb)
    keep = coverage_select(torch.stack([vertical, slash]), valid, forced, gamma, min_count, max_count)
    return keep[0], keep[1], query_aware


def naive_pooled_map(
    q: torch.Tensor, k_bar: torch.Tensor, query_aware: torch.Tensor, layout: BatchLayout, scale: float,
    gamma: float, iters: int = 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of ``kernels.block_lists.pooled_map`` (same arguments; the kernel's bisection
    steps ``iters`` bound how close its threshold is to this exact one, found by a sort):
    ``pooled_one`` of each sparse sequence, on
    the mean query of each of its query tiles, laid end to end ([HQ, Pt]), and the maps'
    thresholds (``naive_coverage_threshold``, [N, HQ]). q: [Tq, HQ, D]."""
    seqs = layout.sparse_seqs()
    bs = layout.block_size
    parts = [pooled_one(block_means(q[layout.q_range(s)], bs, offset=(layout.k_lens[s] - layout.q_lens[s]) % bs),
                        k_bar[seqs.kb_start[j]:seqs.kb_start[j] + layout.num_key_blocks(s)], query_aware[s],
                        layout.first_row(s), scale) for j, s in enumerate(seqs.seqs)]
    pooled = torch.cat(parts, 1) if parts else torch.empty(q.shape[1], 0, device=q.device)
    return pooled, naive_coverage_threshold(pooled, query_aware, layout, gamma)


def pooled_one(
    q_bar: torch.Tensor, k_bar: torch.Tensor, query_aware: torch.Tensor, first_row: int, scale: float
) -> torch.Tensor:
    """The query-aware heads' pooled block map of one sequence.

    Args:
        q_bar: [R, HQ, D] float32 mean query per query tile (tile rows first_row ..);
        k_bar: [NB, H, D] float32 key block means; query_aware: [HQ] bool.
    Returns:
        [HQ, R * NB] float32: per tile row, ``softmax_c(scale * q_bar[r] . k_bar[c])`` over its
        causal blocks c <= first_row + r (0 elsewhere); rows of other heads are unspecified
        (here: computed the same way).
    """
    r, hq, _ = q_bar.shape
    nb = k_bar.shape[0]
    keys = k_bar.repeat_interleave(hq // k_bar.shape[1], dim=1)
    logits = scale * torch.einsum("rhd,chd->hrc", q_bar, keys)
    rows = torch.arange(first_row, first_row + r, device=q_bar.device)
    causal = torch.arange(nb, device=q_bar.device)[None, :] <= rows[:, None]
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1).reshape(hq, r * nb)


def naive_write_block_lists(
    block_idx: torch.Tensor, block_cnt: torch.Tensor, off_diagonal: torch.Tensor, layout: BatchLayout,
    keep_v: torch.Tensor | None = None,
    keep_s: torch.Tensor | None = None, query_aware: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None, count_into: torch.Tensor | None = None,
) -> None:
    """Twin of ``kernels.block_lists.write_block_lists`` (same arguments): ``lists_one`` of
    each sequence, dense ones keeping every causal block; the lengths' sum added to
    ``count_into``'s first counter."""
    seqs = layout.sparse_seqs()
    slot = {s: j for j, s in enumerate(seqs.seqs)}
    for s in range(layout.num_seqs):
        where = dict(first_tile=layout.first_tile[s], first_row=layout.first_row(s),
                     num_rows=layout.first_tile[s + 1] - layout.first_tile[s], nb=layout.num_key_blocks(s),
                     list_start=layout.list_starts[s])
        if not layout.sparse[s] or keep_v is None:
            lists_one(block_idx, block_cnt, **where)
            continue
        j = slot[s]
        blocks = slice(seqs.kb_start[j], seqs.kb_start[j] + where["nb"])
        own = {}
        if pooled is not None:
            size = where["num_rows"] * where["nb"]
            own = dict(pooled=pooled[:, seqs.p_start[j]:seqs.p_start[j] + size], threshold=threshold[s],
                       query_aware=query_aware[s])
        lists_one(block_idx, block_cnt, **where, keep_v=keep_v[:, blocks], keep_s=keep_s[:, blocks], **own,
                  dense_from=probe_row(layout.q_lens[s], layout.k_lens[s], layout.block_size))
    off_diagonal.copy_(block_cnt - 1)
    if count_into is not None:
        count_into[0] += block_cnt.sum().to(count_into.dtype)


def lists_one(
    block_idx: torch.Tensor, block_cnt: torch.Tensor, first_tile: int, first_row: int, num_rows: int, nb: int,
    list_start: int, keep_v: torch.Tensor | None = None, keep_s: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None, query_aware: torch.Tensor | None = None, dense_from: int | None = None,
) -> None:
    """Builds the block mask of one sequence's tiles and compacts it into its lists.

    Args:
        first_tile, first_row, num_rows, nb, list_start: where the sequence's tiles and
            their lists ([num_rows, nb] entries from list_start of each head's lists) sit.
        keep_v, keep_s: [HQ, NB] chosen verticals / slash offsets; None for a dense sequence.
        pooled: [HQ, R * NB] pooled block map, threshold: [HQ], query_aware: [HQ]; or None.
        dense_from: block row from which tiles keep every causal block (None: none).
    """
    hq = block_idx.shape[0]
    device = block_idx.device
    rows = torch.arange(first_row, first_row + num_rows, device=device)
    cols = torch.arange(nb, device=device)
    diff = rows[:, None] - cols[None, :]
    causal = (diff >= 0).expand(hq, -1, -1)
    if keep_v is None:
        mask = causal
    else:
        keep_v, keep_s = keep_v.bool(), keep_s.bool()
        mask = causal & (keep_v[:, None, :] | keep_s[:, diff.clamp_min(0)])
        if pooled is not None:
            chosen = pooled.view(-1, num_rows, nb) >= threshold[:, None, None]
            mask = mask | (causal & chosen & query_aware.bool()[:, None, None])
        if dense_from is not None:
            mask = mask | (causal & (rows >= dense_from)[None, :, None])
    idx, cnt = mask_to_lists(mask)
    block_idx[:, list_start:list_start + num_rows * nb] = idx.reshape(hq, -1)
    block_cnt[:, first_tile:first_tile + num_rows] = cnt


def naive_coverage_threshold(pooled: torch.Tensor, query_aware: torch.Tensor, layout: BatchLayout,
                             gamma: float) -> torch.Tensor:
    """The thresholds of ``kernels.block_lists.pooled_map``: ``threshold_one`` of each sparse
    sequence's map with target gamma x its rows; [N, HQ], 2 for dense sequences."""
    seqs = layout.sparse_seqs()
    out = torch.full((layout.num_seqs, pooled.shape[0]), 2.0, device=pooled.device)
    for j, s in enumerate(seqs.seqs):
        rows = layout.first_tile[s + 1] - layout.first_tile[s]
        size = rows * layout.num_key_blocks(s)
        out[s] = threshold_one(pooled[:, seqs.p_start[j]:seqs.p_start[j] + size], query_aware[s], gamma * rows)
    return out


def threshold_one(pooled: torch.Tensor, query_aware: torch.Tensor, target: float) -> torch.Tensor:
    """Per head, the smallest value of the shortest descending prefix of its map whose mass
    reaches ``target`` (2 for heads that are not query-aware)."""
    values = torch.sort(pooled.float(), dim=-1, descending=True).values
    before = torch.cumsum(values, -1) - values
    count = (before < target).sum(-1).clamp_min(1)
    crossing = torch.gather(values, -1, (count - 1)[:, None])[:, 0]
    return torch.where(query_aware.bool(), crossing, 2.0)


def naive_flash_attn_block_sparse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, mask_cnt: torch.Tensor, mask_idx: torch.Tensor, full_cnt: torch.Tensor,
    full_idx: torch.Tensor, cu_tiles: torch.Tensor, cu_lists: torch.Tensor, block_size: int, scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Twin of ``kernels.fa4.flash_attn_block_sparse`` (same arguments): FlashAttention-4's
    varlen block-sparse causal forward as it reads its arguments.

    Sequence b's queries [Lq] and keys [Lk] are causal bottom-right (query i sees keys up to
    Lk - Lq + i). Its query block i (rows i*BS ..) is tile ``cu_tiles[b] + i``; its lists
    start at ``cu_lists[b] + i * NB`` (NB = ceil(Lk / BS)) of each head's row of mask_idx and
    full_idx. The first mask_cnt[h, tile] "mask" blocks are computed with the causal mask,
    the first full_cnt[h, tile] "full" blocks without any. A row that sees no key gives 0.

    Args:
        q: [Tq, HQ, D]; k, v: [Tk, H, D]; mask_cnt, full_cnt: [HQ, NQB]; mask_idx, full_idx:
            [HQ, L] (broadcast views work as well).
    """
    hq, group = q.shape[1], q.shape[1] // k.shape[1]
    if out is None:
        out = torch.empty(q.shape[0], hq, v.shape[2], dtype=q.dtype, device=q.device)
    qs_, ks_ = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    tiles, lists = cu_tiles.tolist(), cu_lists.tolist()
    for b in range(len(qs_) - 1):
        lq, lk = qs_[b + 1] - qs_[b], ks_[b + 1] - ks_[b]
        nb = -(-lk // block_size)
        rows = torch.arange(lq, device=q.device)
        q_pos = lk - lq + rows
        k_pos = torch.arange(lk, device=q.device)
        tile = tiles[b] + rows // block_size  # [Lq]
        start = lists[b] + (rows // block_size) * nb  # [Lq]
        token_mask = torch.zeros(hq, lq, lk, dtype=torch.bool, device=q.device)
        for cnt, idx, causal in ((mask_cnt, mask_idx, True), (full_cnt, full_idx, False)):
            entry = torch.arange(nb, device=q.device)
            ids = idx.expand(hq, -1)[:, (start[:, None] + entry[None, :])].long()  # [HQ, Lq, NB]
            listed = entry[None, None, :] < cnt.expand(hq, -1)[:, tile][:, :, None]
            blocks = torch.zeros(hq, lq, nb + 1, dtype=torch.bool, device=q.device)
            blocks.scatter_(-1, torch.where(listed & (ids >= 0) & (ids < nb), ids, nb), True)
            key_ok = blocks[..., :nb][:, :, k_pos // block_size]  # [HQ, Lq, Lk]
            if causal:
                key_ok &= k_pos[None, None, :] <= q_pos[None, :, None]
            token_mask |= key_ok
        qb = q[qs_[b]:qs_[b + 1]].float().transpose(0, 1)
        kb = k[ks_[b]:ks_[b + 1]].float().repeat_interleave(group, dim=1).transpose(0, 1)
        vb = v[ks_[b]:ks_[b + 1]].float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (scale * qb @ kb.transpose(1, 2)).masked_fill(~token_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[qs_[b]:qs_[b + 1]] = (probs @ vb).transpose(0, 1).to(out.dtype)
    return out


def naive_gather_rows(k: torch.Tensor, v: torch.Tensor, k_rows: torch.Tensor, k_out: torch.Tensor,
                      v_out: torch.Tensor) -> None:
    """Twin of ``kernels.gather.gather_rows`` (same arguments): the rows of a paged cache's
    key and value views at ``k_rows`` [Tk], copied into k_out, v_out [Tk, H, D]."""
    k_out.copy_(rows_of(k, k_rows))
    v_out.copy_(rows_of(v, k_rows))
