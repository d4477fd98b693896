"""Budget rules shared by the naive and the batched estimators.

A *coverage* selection keeps the smallest prefix of blocks, in descending mass order with
the forced block first, whose mass reaches ``gamma`` of the total, then clamps the count
to the budget. Counting on the blocks themselves (not on tokens, as the reference does)
guarantees the chosen blocks cover ``gamma`` of the probe's mass unless a cap stops them.
"""

from __future__ import annotations

import torch


def js_distance(p: torch.Tensor, q: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Jensen-Shannon distance (natural log, in [0, sqrt(ln 2)]) over the last axis.

    Zero probabilities contribute 0 (0 * log 0 = 0), so the result is never NaN.
    ``valid`` [..., n] bool marks the entries that take part.
    """
    p = p.float()
    q = q.float()
    if valid is not None:
        p = torch.where(valid, p, 0.0)
        q = torch.where(valid, q, 0.0)
    m = 0.5 * (p + q)
    tiny = torch.finfo(torch.float32).tiny

    def kl(x: torch.Tensor) -> torch.Tensor:
        terms = x * (torch.log(x.clamp_min(tiny)) - torch.log(m.clamp_min(tiny)))
        return torch.where(x > 0, terms, 0.0).sum(-1)

    return (0.5 * (kl(p) + kl(q))).clamp_min(0.0).sqrt()


def coverage_select(
    mass: torch.Tensor,
    valid: torch.Tensor,
    forced: torch.Tensor,
    gamma: float,
    min_count: torch.Tensor | int,
    max_count: torch.Tensor | int,
) -> torch.Tensor:
    """Selects, per row, the blocks that cover ``gamma`` of the row's mass.

    Args:
        mass: [..., n] float, non-negative.
        valid: [..., n] bool, entries that may be chosen (padding is never chosen).
        forced: [..., n] bool, entries chosen first whatever their mass.
        gamma: coverage target in (0, 1].
        min_count, max_count: [...] or scalars, the clamp on the number chosen; the
            count is also capped at the number of valid entries.
    Returns:
        [..., n] bool selection.
    """
    mass = torch.where(valid, mass.float(), 0.0)
    key = torch.where(forced & valid, float("inf"), mass)
    key = torch.where(valid, key, -1.0)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    sorted_mass = torch.gather(mass, -1, order)
    before = torch.cumsum(sorted_mass, dim=-1) - sorted_mass
    total = mass.sum(-1, keepdim=True)
    count = (before < gamma * total).sum(-1)
    n_valid = valid.sum(-1)
    count = torch.maximum(count, min_count) if isinstance(min_count, torch.Tensor) else count.clamp_min(min_count)
    count = torch.minimum(count, max_count) if isinstance(max_count, torch.Tensor) else count.clamp_max(max_count)
    count = torch.minimum(count, n_valid)
    rank_selected = torch.arange(mass.shape[-1], device=mass.device) < count.unsqueeze(-1)
    selected = torch.zeros_like(valid)
    selected.scatter_(-1, order, rank_selected)
    return selected
