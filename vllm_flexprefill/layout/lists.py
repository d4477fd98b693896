"""The block-list format: which key blocks each (query head, query tile) attends to.

A head's lists sit end to end (``BatchLayout.tile_list``): tile t's list starts at
``tile_list[t]`` and has room for its sequence's NB blocks, so that one sequence's lists
form an [R, NB] matrix. Each list holds sorted key-block ids and ends with the tile's
diagonal block (its row), which every list keeps; entries past the count are -1.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vllm_flexprefill.layout.batch import BatchLayout


@dataclasses.dataclass(frozen=True)
class BlockSelection:
    """The key blocks each (query head, query tile) attends to.

    block_idx: [HQ, L] int32 lists laid out as ``BatchLayout.tile_list`` says (L =
        ``list_size``), sorted ascending, -1 after the count.
    block_cnt: [HQ, NQB] int32 blocks of each list, the diagonal included.
    off_diagonal: [HQ, NQB] int32 blocks of each list before the diagonal (block_cnt - 1):
        the "full" blocks of FlashAttention-4's block sparsity.
    query_aware: [N, HQ] bool: heads that took the query-aware pattern (False for dense
        sequences).
    """

    block_idx: torch.Tensor
    block_cnt: torch.Tensor
    off_diagonal: torch.Tensor
    query_aware: torch.Tensor

    def density(self, layout: BatchLayout) -> torch.Tensor:
        """[N, HQ] float: computed blocks / causal blocks per sequence and head."""
        counts = self.block_cnt.float()
        out = torch.zeros(layout.num_seqs, counts.shape[0], device=counts.device)
        for s in range(layout.num_seqs):
            lo, hi = layout.first_tile[s], layout.first_tile[s + 1]
            out[s] = counts[:, lo:hi].sum(-1) / layout.causal_blocks_of(s)
        return out

    def padded(self, layout: BatchLayout) -> torch.Tensor:
        """[HQ, NQB, NB_max] int32: each tile's list in a row, -1 padded (for inspection)."""
        hq = self.block_idx.shape[0]
        out = torch.full((hq, layout.num_tiles, layout.max_key_blocks), -1, dtype=torch.int32,
                         device=self.block_idx.device)
        for s in range(layout.num_seqs):
            lo, hi, nb = layout.first_tile[s], layout.first_tile[s + 1], layout.num_key_blocks(s)
            start = layout.list_starts[s]
            out[:, lo:hi, :nb] = self.block_idx[:, start:start + (hi - lo) * nb].view(hq, hi - lo, nb)
        return out


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


def selection_from_mask(mask: torch.Tensor, layout: BatchLayout, query_aware: torch.Tensor | None = None
                        ) -> BlockSelection:
    """The lists of a block mask [HQ, NQB, NB_max] bool (each tile's columns past its
    sequence's NB must be False; every tile must keep its diagonal)."""
    hq = mask.shape[0]
    idx, cnt = mask_to_lists(mask)
    flat = torch.empty(hq, layout.list_size, dtype=torch.int32, device=mask.device)
    for s in range(layout.num_seqs):
        lo, hi, nb = layout.first_tile[s], layout.first_tile[s + 1], layout.num_key_blocks(s)
        start = layout.list_starts[s]
        flat[:, start:start + (hi - lo) * nb] = idx[:, lo:hi, :nb].reshape(hq, -1)
    if query_aware is None:
        query_aware = torch.zeros(layout.num_seqs, hq, dtype=torch.bool, device=mask.device)
    return BlockSelection(flat, cnt, cnt - 1, query_aware)


def causal_mask(layout: BatchLayout, num_heads: int) -> torch.Tensor:
    """[HQ, NQB, NB_max] bool: every causal block of every tile (dense attention)."""
    cols = torch.arange(layout.max_key_blocks, device=layout.tile_row.device)
    mask = cols[None, :] <= layout.tile_row[:, None].long()
    return mask.unsqueeze(0).expand(num_heads, -1, -1).contiguous()
