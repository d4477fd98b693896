"""Device buffers that the layer calls of one step share, instead of allocating their own.

A sparse layer call needs about fifteen scratch tensors (probe statistics, chosen blocks,
pooled maps, block lists, segment partials, counters). Allocating them costs the host
microseconds each, more for each zeroed counter: a tenth of a layer call's host time. The
layers of one step run one after another on one stream with the same layout, so a buffer
that one call writes and reads is free again when the next call's first kernel runs. The
builder gives each step's layouts a ``Workspace`` (``attention.plan_cuda``); the kernels'
wrappers take their buffers from ``buffers(layout)``, which allocates afresh for layouts
without one (direct calls and tests: results that outlive the next call stay intact).

Counters (``zeros``) are zeroed when first made; the kernel that counts on them sets each
back to zero when its last program is done, so the next call finds them zero.
"""

from __future__ import annotations

import torch


class Fresh:
    """New tensors on every request: for layouts without a workspace."""

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    def zeros(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)


class Workspace(Fresh):
    """The same tensor for the same (name, shape, dtype, device) on every request."""

    def __init__(self) -> None:
        self.tensors: dict[tuple, torch.Tensor] = {}

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        return self._kept((name, shape, dtype, device), super().empty)

    def zeros(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        return self._kept((name, shape, dtype, device), super().zeros)

    def _kept(self, key: tuple, make) -> torch.Tensor:
        t = self.tensors.get(key)
        if t is None:
            t = self.tensors[key] = make(*key)
        return t


FRESH = Fresh()


def buffers(layout) -> Fresh:
    """The layout's workspace (``reuse_buffers``), else ``FRESH``. layout: ``BatchLayout``."""
    return layout.memo.get("workspace", FRESH)


def reuse_buffers(layout) -> Workspace:
    """Gives the layout a workspace, shared by every call made with it from now on."""
    return layout.memo.setdefault("workspace", Workspace())
