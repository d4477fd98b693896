"""Plans that kernels read, derived from a ``BatchLayout`` once per batch: where the dense
tiles run in segments (``TailSplit``), where each sparse sequence's data sits in the
batched estimation's arrays (``SparseSeqs``), and how the batch's tiles map onto
FlashAttention-4's query blocks (``QueryBlocks``). Each table's Triton reader is in
``layout/readers.py``, beside the column order it reads (``SparseSeqs.COLUMNS``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from vllm_flexprefill.layout.batch import int32_on

if TYPE_CHECKING:
    from vllm_flexprefill.layout.batch import BatchLayout


@dataclasses.dataclass(frozen=True)
class TailSplit:
    """The dense tiles cut into segments, and the other tiles (``BatchLayout.tail_split``).

    main_tiles: [NT'] int32 tiles run whole by the block-sparse kernel, last tile first.
    segments: [4, NS] int32, one column per segment, rows as ``FIELDS`` names them: its
        tile, first key block, end key block and the index of its tile in ``split_tiles``;
        the segments of one tile are adjacent and the last one holds its diagonal block
        (read by ``layout.readers.segment``).
    split_tiles: [ND] int32 the cut tiles; seg_first: [ND + 1] int32 where each one's
        segments start in ``segments``.
    """

    FIELDS = ("tile", "first_block", "end_block", "split_index")

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
        columns = [x for column in zip(*segments) for x in column]  # [len(FIELDS), NS] row-major
        main_tiles, flat, split_tiles, first = int32_on(layout.tile_seq.device, main[::-1], columns, split, seg_first)
        return TailSplit(main_tiles=main_tiles, segments=flat.view(len(TailSplit.FIELDS), len(segments)),
                         split_tiles=split_tiles,
                         seg_first=first)


@dataclasses.dataclass(frozen=True)
class SparseSeqs:
    """The sparse sequences of a batch, laid end to end for the batched estimation.

    Sparse sequence j (batch sequence ``seqs[j]``) owns key blocks ``kb_start[j] ..
    + NB_j`` of the concatenated per-block arrays (probe statistics, block means, chosen
    blocks) and entries ``p_start[j] .. + R_j * NB_j`` of the concatenated pooled maps (R_j:
    its query tiles).

    table: [max(S, 1), len(COLUMNS)] int32, one row per sparse sequence with the columns
        ``COLUMNS`` names: what the kernels read (``layout.readers.sparse_seq``).
    slot: [N] int32 row of each batch sequence in ``table``, -1 for a dense one.
    """

    COLUMNS = ("seq", "q_start", "q_len", "k_start", "k_len", "kb_start", "p_start")

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
                                                          layout.k_lens[s], kb_start[j], p_start[j])]  # COLUMNS
        slot = [-1] * layout.num_seqs
        for j, s in enumerate(seqs):
            slot[s] = j
        # a batch without sparse sequences still gets one (unused) row for the lists kernel
        width = len(SparseSeqs.COLUMNS)
        flat, slots = int32_on(layout.tile_seq.device, table or [0] * width, slot)
        return SparseSeqs(seqs=tuple(seqs), kb_start=kb_start[:-1], p_start=p_start[:-1],
                          num_blocks=kb_start[-1], pooled_size=p_start[-1],
                          max_blocks=max(nbs, default=0), max_rows=max(rows, default=0),
                          table=flat.view(-1, width), slot=slots)




@dataclasses.dataclass(frozen=True)
class QueryBlocks:
    """The batch as FlashAttention-4's varlen block sparsity reads it (``BatchLayout.query_blocks``).

    FA4 cuts each sequence's queries into blocks of BS from its first query; the tiles of
    ``BatchLayout`` start at block boundaries of the key positions. They coincide where a
    sequence's queries start on a boundary. Elsewhere the sequence's queries are padded in
    front with ``ctx % BS`` rows (positions ctx - pad .. ctx - 1: they attend causally like
    any query and their output is dropped), so that FA4's query block i is tile i. Each
    sequence's lists are then FA4's [R, NB] matrix at ``BatchLayout.cu_lists``; the diagonal
    block, the only one that needs the causal mask, is FA4's one "mask" block per tile
    (``diagonal``), the blocks before it its "full" blocks (``BlockSelection.off_diagonal``).

    padded: whether any sequence is padded (else q and the output are used as they are).
    cu_seqlens_q: [N + 1] int32 offsets of the (padded) queries.
    q_rows: [Tq] int64 row of each query in the padded queries (None when not padded).
    num_rows: rows of the padded queries.
    max_seqlen_q, max_seqlen_k: the longest (padded) query and key ranges.
    diagonal: [1, L] int32 each tile's diagonal block at its list's start (0 elsewhere);
        ones: [1, NQB] int32 (one mask block per tile). Both broadcast over the heads.
    """

    padded: bool
    cu_seqlens_q: torch.Tensor
    q_rows: torch.Tensor | None
    num_rows: int
    max_seqlen_q: int
    max_seqlen_k: int
    diagonal: torch.Tensor
    ones: torch.Tensor

    @staticmethod
    def plan(layout: BatchLayout) -> QueryBlocks:
        bs = layout.block_size
        pads = [(k - q) % bs for q, k in zip(layout.q_lens, layout.k_lens)]
        padded = any(pads)
        device = layout.tile_row.device
        q_rows = None
        cu_q = layout.cu_seqlens_q
        lens = [q + p for q, p in zip(layout.q_lens, pads)]
        if padded:
            starts = (0, *itertools.accumulate(lens))
            (cu_q,) = int32_on(device, starts)
            q_rows = torch.cat([torch.arange(a + p, b, device=device) for a, b, p in zip(starts, starts[1:], pads)])
        # each tile's diagonal block at the start of its list: made on the device (two launches
        # per batch; the lists hold a million entries at 128k keys)
        diagonal = torch.zeros(1, layout.list_size, dtype=torch.int32, device=device)
        diagonal[0, layout.tile_list[:-1].long()] = layout.tile_row
        ones = torch.ones(1, layout.num_tiles, dtype=torch.int32, device=device)
        return QueryBlocks(padded=padded, cu_seqlens_q=cu_q, q_rows=q_rows, num_rows=sum(lens),
                           max_seqlen_q=max(lens, default=0), max_seqlen_k=max(layout.k_lens, default=0),
                           diagonal=diagonal, ones=ones)
