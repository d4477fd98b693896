"""The block-list format: which key blocks each (query head, query tile) attends to."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vllm_flexprefill.layout.batch import BatchLayout


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


