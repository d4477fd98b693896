"""How a varlen batch sits on the sparse block grid, and the block-list format.

Shape letters (docs/algorithm.md): N sequences, T tokens, HQ query heads, BS the sparse
block size, NB key blocks of a sequence, NQB query tiles of the batch.

Each sequence holds ``k_len`` keys at positions ``0 .. k_len-1`` and its ``q_len``
queries are the last ``q_len`` of those positions (a fresh prompt has q_len == k_len; a
chunk of chunked prefill or a prefix-cache hit has q_len < k_len). Key block ``c`` holds
positions ``[c*BS, (c+1)*BS)``. Query tiles use the same grid: tile row ``r`` holds the
sequence's queries whose positions fall in ``[r*BS, (r+1)*BS)``, so the first tile of a
chunk may be partial, and key block ``r`` is always the tile's diagonal block. Only the
diagonal block needs a causal mask.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Per-batch plan, computed once on the host from the sequence lengths.

    Every tensor field lives on ``device``; the tuples are host copies for planning.
    """

    block_size: int
    q_lens: tuple[int, ...]
    k_lens: tuple[int, ...]
    sparse: tuple[bool, ...]
    """Which sequences run the estimation; the others keep every causal block (dense)."""
    cu_seqlens_q: torch.Tensor
    """[N + 1] int32: query offsets into the packed queries."""
    cu_seqlens_k: torch.Tensor
    """[N + 1] int32: key offsets into the packed keys/values."""
    tile_seq: torch.Tensor
    """[NQB] int32: sequence of each query tile."""
    tile_row: torch.Tensor
    """[NQB] int32: block row of each query tile on its sequence's grid."""
    first_tile: tuple[int, ...]
    """Index of each sequence's first tile; ``first_tile[N]`` = NQB."""
    q_starts: tuple[int, ...]
    """Host copy of cu_seqlens_q."""
    k_starts: tuple[int, ...]
    """Host copy of cu_seqlens_k."""
    memo: dict = dataclasses.field(default_factory=dict, init=False, compare=False, repr=False)
    """Plans derived from the layout (``tail_split``), made once per layout, not per layer."""

    def q_range(self, seq: int) -> slice:
        """Rows of a sequence's queries in the packed queries."""
        return slice(self.q_starts[seq], self.q_starts[seq + 1])

    def k_range(self, seq: int) -> slice:
        """Rows of a sequence's keys in the packed keys/values."""
        return slice(self.k_starts[seq], self.k_starts[seq + 1])

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens)

    @property
    def num_tiles(self) -> int:
        return self.first_tile[-1]

    def num_key_blocks(self, seq: int) -> int:
        return -(-self.k_lens[seq] // self.block_size)

    @property
    def max_key_blocks(self) -> int:
        """NB of the longest sequence: the width of block masks and lists."""
        return max((self.num_key_blocks(s) for s in range(self.num_seqs)), default=0)

    def first_row(self, seq: int) -> int:
        """Block row of a sequence's first query tile."""
        return (self.k_lens[seq] - self.q_lens[seq]) // self.block_size

    def causal_blocks_of(self, seq: int) -> int:
        """Key blocks a dense causal pass over one sequence's tiles visits (per head)."""
        return sum(r + 1 for r in range(self.first_row(seq), self.num_key_blocks(seq)))

    def causal_blocks(self) -> int:
        """Key blocks a dense causal pass over every tile visits (per head)."""
        return sum(self.causal_blocks_of(s) for s in range(self.num_seqs))

    def tail_split(self, dense_from: Sequence[int | None], seg_blocks: int, max_segments: int = 8
                   ) -> TailSplit | None:
        """Which tiles attend to every causal key block in segments rather than in one program.

        The tiles from block row ``dense_from[s]`` on (a sparse sequence's probe rows; None:
        none) keep every causal block: with r + 1 blocks, one program per tile would be the
        longest of the grid and set the kernel's time. Such a tile longer than ``2 *
        seg_blocks`` blocks is cut into segments of at least ``seg_blocks`` blocks (at most
        ``max_segments``, which bounds the float32 partial outputs), each a program of its
        own, merged by the last of them to finish (``kernels.block_sparse_attn``). None when no tile is that
        long. Made once per layout and arguments.
        """
        key = ("tail_split", tuple(dense_from), seg_blocks, max_segments)
        if key not in self.memo:
            self.memo[key] = TailSplit.plan(self, dense_from, seg_blocks, max_segments)
        return self.memo[key]

    def sparse_seqs(self) -> SparseSeqs:
        """The sequences that run the estimation, as its batched kernels read them (made once
        per layout)."""
        if "sparse_seqs" not in self.memo:
            self.memo["sparse_seqs"] = SparseSeqs.plan(self)
        return self.memo["sparse_seqs"]

    @staticmethod
    def build(
        q_lens: Sequence[int],
        k_lens: Sequence[int],
        block_size: int,
        device: torch.device | str,
        sparse: Sequence[bool] | None = None,
    ) -> BatchLayout:
        """Plans a batch. ``q_lens[i] <= k_lens[i]``; all lengths are host integers."""
        q_lens = tuple(int(x) for x in q_lens)
        k_lens = tuple(int(x) for x in k_lens)
        if len(q_lens) != len(k_lens):
            raise ValueError(f"q_lens and k_lens must have one entry per sequence, got {len(q_lens)} and {len(k_lens)}")
        for i, (ql, kl) in enumerate(zip(q_lens, k_lens)):
            if not 0 < ql <= kl:
                raise ValueError(
                    f"sequence {i}: need 0 < q_len <= k_len (queries are the last q_len of k_len positions), "
                    f"got q_len={ql}, k_len={kl}")
        sparse = tuple(bool(x) for x in sparse) if sparse is not None else (True,) * len(q_lens)
        tile_seq: list[int] = []
        tile_row: list[int] = []
        first_tile = [0]
        for s, (ql, kl) in enumerate(zip(q_lens, k_lens)):
            rows = range((kl - ql) // block_size, -(-kl // block_size))
            tile_seq += [s] * len(rows)
            tile_row += list(rows)
            first_tile.append(len(tile_seq))

        q_starts = (0, *itertools.accumulate(q_lens))
        k_starts = (0, *itertools.accumulate(k_lens))
        cu_q, cu_k, seq, row = int32_on(device, q_starts, k_starts, tile_seq, tile_row)
        return BatchLayout(
            block_size=block_size,
            q_lens=q_lens,
            k_lens=k_lens,
            sparse=sparse,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            tile_seq=seq,
            tile_row=row,
            first_tile=tuple(first_tile),
            q_starts=q_starts,
            k_starts=k_starts,
        )


@dataclasses.dataclass(frozen=True)
class TailSplit:
    """The dense tiles cut into segments, and the other tiles (``BatchLayout.tail_split``).

    main_tiles: [NT'] int32 tiles run whole by the block-sparse kernel, last tile first.
    segments: [4, NS] int32 tile, first key block, end key block of each segment and the
        index of its tile in ``split_tiles``; the segments of one tile are adjacent and the
        last one holds its diagonal block.
    split_tiles: [ND] int32 the cut tiles; seg_first: [ND + 1] int32 where each one's
        segments start in ``segments``.
    """

    main_tiles: torch.Tensor
    segments: torch.Tensor
    split_tiles: torch.Tensor
    seg_first: torch.Tensor

    @staticmethod
    def plan(layout: BatchLayout, dense_from: Sequence[int | None], seg_blocks: int, max_segments: int
             ) -> TailSplit | None:
        main, segments, split, seg_first = [], [], [], [0]
        for s in range(layout.num_seqs):
            row0 = layout.first_row(s)
            for t in range(layout.first_tile[s], layout.first_tile[s + 1]):
                row = row0 + t - layout.first_tile[s]
                blocks = row + 1
                if dense_from[s] is None or row < dense_from[s] or blocks <= 2 * seg_blocks:
                    main.append(t)
                    continue
                n = min(max_segments, blocks // seg_blocks)
                bounds = [blocks * i // n for i in range(n + 1)]
                segments += [(t, a, b, len(split)) for a, b in zip(bounds, bounds[1:])]
                split.append(t)
                seg_first.append(len(segments))
        if not split:
            return None
        columns = [x for column in zip(*segments) for x in column]  # [4, NS] row-major
        main_tiles, flat, split_tiles, first = int32_on(layout.tile_seq.device, main[::-1], columns, split, seg_first)
        return TailSplit(main_tiles=main_tiles, segments=flat.view(4, len(segments)), split_tiles=split_tiles,
                         seg_first=first)


@dataclasses.dataclass(frozen=True)
class SparseSeqs:
    """The sparse sequences of a batch, laid end to end for the batched estimation.

    Sparse sequence j (batch sequence ``seqs[j]``) owns key blocks ``kb_start[j] ..
    + NB_j`` of the concatenated per-block arrays (probe statistics, block means, chosen
    blocks) and entries ``p_start[j] .. + R_j * NB_j`` of the concatenated pooled maps (R_j:
    its query tiles).

    table: [max(S, 1), 7] int32 rows of (seq, q_start, q_len, k_start, k_len, kb_start,
        p_start): what the kernels read (``kernels.probe._sparse_seq``).
    slot: [N] int32 row of each batch sequence in ``table``, -1 for a dense one.
    """

    COLUMNS = 7  # ints per row of ``table`` (``kernels.probe._sparse_seq`` reads them)

    seqs: tuple[int, ...]
    kb_start: tuple[int, ...]
    p_start: tuple[int, ...]
    num_blocks: int
    """Key blocks of all sparse sequences (NBt)."""
    pooled_size: int
    """Entries of all their pooled maps."""
    max_blocks: int
    max_rows: int
    table: torch.Tensor
    slot: torch.Tensor

    @staticmethod
    def plan(layout: BatchLayout) -> SparseSeqs:
        seqs = [s for s in range(layout.num_seqs) if layout.sparse[s]]
        nbs = [layout.num_key_blocks(s) for s in seqs]
        rows = [layout.first_tile[s + 1] - layout.first_tile[s] for s in seqs]
        kb_start = (0, *itertools.accumulate(nbs))
        p_start = (0, *itertools.accumulate(r * nb for r, nb in zip(rows, nbs)))
        table = [x for j, s in enumerate(seqs) for x in (s, layout.q_starts[s], layout.q_lens[s], layout.k_starts[s],
                                                          layout.k_lens[s], kb_start[j], p_start[j])]
        slot = [-1] * layout.num_seqs
        for j, s in enumerate(seqs):
            slot[s] = j
        # a batch without sparse sequences still gets one (unused) row for the lists kernel
        flat, slots = int32_on(layout.tile_seq.device, table or [0] * SparseSeqs.COLUMNS, slot)
        return SparseSeqs(seqs=tuple(seqs), kb_start=kb_start[:-1], p_start=p_start[:-1],
                          num_blocks=kb_start[-1], pooled_size=p_start[-1],
                          max_blocks=max(nbs, default=0), max_rows=max(rows, default=0),
                          table=flat.view(-1, SparseSeqs.COLUMNS), slot=slots)


def int32_on(device: torch.device | str, *arrays: Sequence[int]) -> list[torch.Tensor]:
    """int32 tensors of host integer lists on ``device``, made by one copy: on CUDA from pinned
    memory without waiting (the builder does not stall on the GPU's queue). Each starts on a
    16-byte boundary, as fresh tensors do (the kernels are compiled for aligned pointers)."""
    flat: list[int] = []
    bounds = []
    for values in arrays:
        bounds.append((len(flat), len(values)))
        flat += list(values) + [0] * (-len(values) % 4)
    host = torch.tensor(flat, dtype=torch.int32)
    if torch.device(device).type == "cuda":
        host = host.pin_memory().to(device, non_blocking=True)
    else:
        host = host.to(device)
    return [host[start:start + n] for start, n in bounds]


@dataclasses.dataclass(frozen=True)
class BlockSelection:
    """The key blocks each (query head, query tile) attends to.

    ``block_idx`` [HQ, NQB, NB_max] int32: key-block ids of the tile's sequence, sorted
    ascending, each row padded with -1 after ``block_cnt`` entries. ``block_cnt``
    [HQ, NQB] int32. ``query_aware`` [N, HQ] bool: heads that took the query-aware
    pattern (False for dense sequences).
    """

    block_idx: torch.Tensor
    block_cnt: torch.Tensor
    query_aware: torch.Tensor

    def density(self, layout: BatchLayout) -> torch.Tensor:
        """[N, HQ] float: computed blocks / causal blocks per sequence and head."""
        counts = self.block_cnt.float()
        out = torch.zeros(layout.num_seqs, counts.shape[0], device=counts.device)
        for s in range(layout.num_seqs):
            lo, hi = layout.first_tile[s], layout.first_tile[s + 1]
            out[s] = counts[:, lo:hi].sum(-1) / layout.causal_blocks_of(s)
        return out


def block_means(x: torch.Tensor, block_size: int, offset: int = 0) -> torch.Tensor:
    """[L, H, D] -> [NB, H, D] float32 means over the blocks of a grid on which x starts
    ``offset`` tokens into its first block (partial first/last blocks are true means).

    Sums accumulate in float32 without copying x to float32.
    """
    n = x.shape[0]
    head = min(n, (block_size - offset) % block_size)  # tokens in a partial first block
    parts = []
    if head:
        parts.append(x[:head].sum(0, keepdim=True, dtype=torch.float32) / head)
    full = (n - head) // block_size
    if full:
        body = x[head:head + full * block_size].view(full, block_size, *x.shape[1:])
        parts.append(body.sum(1, dtype=torch.float32) / block_size)
    tail = n - head - full * block_size
    if tail:
        parts.append(x[n - tail:].sum(0, keepdim=True, dtype=torch.float32) / tail)
    return torch.cat(parts)


def mask_to_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compacts a block mask into sorted, -1-padded id lists without host synchronisation.

    Args:
        mask: [HQ, NQB, NB] bool.
    Returns:
        block_idx [HQ, NQB, NB] int32 and block_cnt [HQ, NQB] int32.
    """
    hq, nqb, nb = mask.shape
    pos = torch.cumsum(mask, dim=-1, dtype=torch.int32) - 1
    # Unselected blocks are written to a spare column that is dropped afterwards.
    pos = torch.where(mask, pos, nb)
    ids = torch.arange(nb, dtype=torch.int32, device=mask.device).expand(hq, nqb, nb)
    out = torch.full((hq, nqb, nb + 1), -1, dtype=torch.int32, device=mask.device)
    out.scatter_(-1, pos.long(), ids)
    return out[..., :nb].contiguous(), mask.sum(-1, dtype=torch.int32)


def causal_mask(layout: BatchLayout, num_heads: int) -> torch.Tensor:
    """[HQ, NQB, NB_max] bool: every causal block of every tile (dense attention)."""
    cols = torch.arange(layout.max_key_blocks, device=layout.tile_row.device)
    mask = cols[None, :] <= layout.tile_row[:, None].long()
    return mask.unsqueeze(0).expand(num_heads, -1, -1).contiguous()


def paged_rows(cache: torch.Tensor, pages: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[T] int64: where each token's row starts in a paged cache view [pages, page_size, H, D],
    in elements (the kernels' ``k_rows``)."""
    return pages.long() * cache.stride(0) + offsets.long() * cache.stride(1)


def rows_of(cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[T, H, D]: the rows of a paged cache view at element offsets ``rows`` (a copy)."""
    h, d = cache.shape[-2], cache.shape[-1]
    flat = cache.as_strided((cache.untyped_storage().nbytes() // cache.element_size() - cache.storage_offset(),),
                            (1,))
    heads = torch.arange(h, device=cache.device) * cache.stride(-2)
    dims = torch.arange(d, device=cache.device) * cache.stride(-1)
    return flat[rows.long()[:, None, None] + heads[None, :, None] + dims[None, None, :]]
