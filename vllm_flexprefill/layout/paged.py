"""Reading key positions of a paged KV cache in place: element offsets of their rows."""

from __future__ import annotations

import torch


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
