"""Block masses from the probe's statistics, the probe's rows, and block means: the arithmetic
that the estimation's kernels and the specification share."""

from __future__ import annotations

import torch


def probe_masses(
    m: torch.Tensor, l: torch.Tensor, n_probe: int, k_len: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical and slash block masses from the probe statistics.

    Args:
        m, l: [HQ, NB, BS] per-(key block, probe row) maximum and sum of exponentials.
    Returns:
        vertical [HQ, NB] (mass per key block) and slash [HQ, NB] (mass per block offset
        row - col), each summing to 1 per head.
    """
    hq, nb, bs = m.shape
    # each probe row's log-sum-exp over all key blocks
    log_l = torch.where(l > 0, torch.log(l.clamp_min(1e-38)), float("-inf"))
    lse = torch.logsumexp(m + log_l, dim=1, keepdim=True)
    weight = torch.where(l > 0, l * torch.exp(m - torch.where(torch.isinf(lse), 0.0, lse)), 0.0)
    weight = weight / n_probe
    vertical = weight.sum(-1)
    rows = torch.arange(bs, device=m.device)
    row_block = (k_len - n_probe + rows) // block_size
    offset = row_block[None, :] - torch.arange(nb, device=m.device)[:, None]  # [NB, BS]
    offset = torch.where((offset >= 0) & (rows < n_probe)[None, :], offset, nb)
    slash = torch.zeros(hq, nb + 1, device=m.device)
    slash.scatter_add_(1, offset.flatten().expand(hq, -1), weight.flatten(1))
    return vertical, slash[:, :nb]


def probe_row(q_len: int, k_len: int, block_size: int) -> int:
    """The first block row holding a probe query: from it on, tiles attend to every key.

    The probe's rows are the end of the prompt (in a prompt: the question), whose attention
    makes the first answer token; computing them densely costs one or two rows of blocks.
    """
    return (k_len - min(block_size, q_len)) // block_size


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
