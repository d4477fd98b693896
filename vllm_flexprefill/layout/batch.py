"""How a varlen batch sits on the sparse block grid: ``BatchLayout``, made once per batch.

Shape letters (docs/algorithm.md): N sequences, T tokens, HQ query heads, BS the sparse
block size, NB key blocks of a sequence, NQB query tiles of the batch.

Each sequence holds ``k_len`` keys at positions ``0 .. k_len-1`` and its ``q_len``
queries are the last ``q_len`` of those positions (a fresh prompt has q_len == k_len; a
chunk of chunked prefill or a prefix-cache hit has q_len < k_len). Key block ``c`` holds
positions ``[c*BS, (c+1)*BS)``. Query tiles use the same grid: tile row ``r`` holds the
sequence's queries whose positions fall in ``[r*BS, (r+1)*BS)``, so the first tile of a
chunk may be partial, and key block ``r`` is always the tile's diagonal block. Only the
diagonal block needs a causal mask.

Block lists (``layout/lists.py``) sit end to end per sequence: the R tiles of sequence s own
R x NB_s entries from ``list_starts[s]``, tile by tile (``tile_list``), so that a sequence's
lists form an [R, NB_s] matrix, as FlashAttention-4's varlen block sparsity reads them.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vllm_flexprefill.layout.plans import QueryBlocks, SparseSeqs, TailSplit


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
    tile_list: torch.Tensor
    """[NQB + 1] int32: where each tile's list starts in the block lists (the last entry:
    their total size); a tile's list has room for its sequence's NB key blocks."""
    cu_tiles: torch.Tensor
    """[N + 1] int32: device copy of ``first_tile``."""
    cu_lists: torch.Tensor
    """[N + 1] int32: device copy of ``list_starts``."""
    first_tile: tuple[int, ...]
    """Index of each sequence's first tile; ``first_tile[N]`` = NQB."""
    list_starts: tuple[int, ...]
    """Where each sequence's lists start in the block lists; ``list_starts[N]`` = their size."""
    q_starts: tuple[int, ...]
    """Host copy of cu_seqlens_q."""
    k_starts: tuple[int, ...]
    """Host copy of cu_seqlens_k."""
    memo: dict = dataclasses.field(default_factory=dict, init=False, compare=False, repr=False)
    """Plans derived from the layout (``tail_split``), made once per layout, not per layer."""

    def grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cu_seqlens_q, cu_seqlens_k, tile_seq, tile_row, tile_list): where the tiles and
        their lists sit, as the block-sparse kernels take it."""
        return self.cu_seqlens_q, self.cu_seqlens_k, self.tile_seq, self.tile_row, self.tile_list

    @property
    def list_size(self) -> int:
        """Entries of one head's block lists (every tile's NB)."""
        return self.list_starts[-1]

    @property
    def fresh(self) -> bool:
        """Whether every sequence is a whole prompt (its queries are all its keys)."""
        return self.q_lens == self.k_lens

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
        from vllm_flexprefill.layout.plans import TailSplit

        key = ("tail_split", tuple(dense_from), seg_blocks, max_segments)
        if key not in self.memo:
            self.memo[key] = TailSplit.plan(self, dense_from, seg_blocks, max_segments)
        return self.memo[key]

    def query_blocks(self) -> QueryBlocks:
        """The batch as FlashAttention-4's block-sparse forward reads it (made once per layout)."""
        from vllm_flexprefill.layout.plans import QueryBlocks

        if "query_blocks" not in self.memo:
            self.memo["query_blocks"] = QueryBlocks.plan(self)
        return self.memo["query_blocks"]

    def sparse_seqs(self) -> SparseSeqs:
        """The sequences that run the estimation, as its batched kernels read them (made once
        per layout)."""
        from vllm_flexprefill.layout.plans import SparseSeqs

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
        tile_list: list[int] = []
        first_tile, list_starts = [0], [0]
        for s, (ql, kl) in enumerate(zip(q_lens, k_lens)):
            nb = -(-kl // block_size)
            rows = range((kl - ql) // block_size, nb)
            tile_seq += [s] * len(rows)
            tile_row += list(rows)
            tile_list += range(list_starts[-1], list_starts[-1] + len(rows) * nb, nb)
            first_tile.append(len(tile_seq))
            list_starts.append(list_starts[-1] + len(rows) * nb)
        tile_list.append(list_starts[-1])

        q_starts = (0, *itertools.accumulate(q_lens))
        k_starts = (0, *itertools.accumulate(k_lens))
        cu_q, cu_k, seq, row, lists, cu_tiles, cu_lists = int32_on(
            device, q_starts, k_starts, tile_seq, tile_row, tile_list, first_tile, list_starts)
        return BatchLayout(
            block_size=block_size,
            q_lens=q_lens,
            k_lens=k_lens,
            sparse=sparse,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            tile_seq=seq,
            tile_row=row,
            tile_list=lists,
            cu_tiles=cu_tiles,
            cu_lists=cu_lists,
            first_tile=tuple(first_tile),
            list_starts=tuple(list_starts),
            q_starts=q_starts,
            k_starts=k_starts,
        )


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


