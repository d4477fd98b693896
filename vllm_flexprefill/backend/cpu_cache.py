"""Reading keys and values back from vLLM's CPU KV cache.

The CPU attention kernel stores each page in an ISA-specific order (keys transposed for
``vec``, keys and values interleaved in pairs for ``amx``, ...). Rather than hard-code
those orders, ``learn_page_layout`` asks the kernel's own cache writer where it puts each
element of one page, then checks the answer on random data. A layout it cannot learn
(not a permutation within the page, e.g. a quantized cache) gives None; the backend then
keeps FlexPrefill to fresh prompts, whose keys are the layer's inputs.

Cache shape, as vLLM allocates it: [num_pages, H, page_size, 2 * D]; per (page, head) the
first page_size * D elements hold the keys and the next page_size * D the values.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from vllm_flexprefill.backend.compat import cpu_reshape_and_cache


@dataclasses.dataclass(frozen=True)
class PageLayout:
    """Where element (t, j) of one page of one KV head lives.

    key, value: [page_size, D] int64 positions in the flattened keys (values) of a page.
    """

    key: torch.Tensor
    value: torch.Tensor

    def positions(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the keys and values of tokens at in-page offsets [T] live: two [T, 1, D]."""
        return self.key[offsets][:, None, :], self.value[offsets][:, None, :]


def write_tokens(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
                 isa: str) -> None:
    """Stores key, value [T, H, D] at slots [T] through the CPU kernel's own writer."""
    n, h, page_size, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view(n, h, 2 * page_size, -1).chunk(2, dim=2)
    cpu_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)


def read_tokens(kv_cache: torch.Tensor, pages: torch.Tensor,
                positions: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [T, H, D] of the tokens at pages [T] (int64) and in-page
    ``positions`` (``PageLayout.positions`` of their offsets)."""
    n, h = kv_cache.shape[:2]
    flat = kv_cache.view(n, h, 2, -1)
    p = pages[:, None, None]
    heads = torch.arange(h)[None, :, None]
    key_pos, value_pos = positions
    return flat[:, :, 0][p, heads, key_pos], flat[:, :, 1][p, heads, value_pos]


@functools.lru_cache(maxsize=8)
def learn_page_layout(isa: str, dtype: torch.dtype, page_size: int, head_size: int) -> PageLayout | None:
    """The page layout the CPU kernel uses for this ISA, dtype and shape; None if not a permutation."""
    n = page_size * head_size
    cache = torch.zeros(1, 1, page_size, 2 * head_size, dtype=dtype)
    slots = torch.arange(page_size)
    codes = torch.arange(n).view(page_size, 1, head_size)  # element (t, j) carries t * D + j
    stored = torch.zeros(2, n, dtype=torch.long)
    # one base-16 digit per write: small integers are exact in every float dtype
    for i in range(max(1, math.ceil(math.log(n, 16)))):
        digit = ((codes >> (4 * i)) & 15).to(dtype)
        write_tokens(cache, digit, digit, slots, isa)
        stored += cache.view(2, n).long() << (4 * i)
    everything = torch.arange(n)
    if any(not torch.equal(s.sort().values, everything) for s in stored):
        return None
    where = torch.empty_like(stored).scatter_(1, stored, everything.expand(2, n))
    layout = PageLayout(where[0].view(page_size, head_size), where[1].view(page_size, head_size))

    key, value = torch.randn(2, page_size, 1, head_size).to(dtype)
    write_tokens(cache, key, value, slots, isa)
    got_key, got_value = read_tokens(cache, torch.zeros(page_size, dtype=torch.long), layout.positions(slots))
    if not (torch.equal(got_key, key) and torch.equal(got_value, value)):
        return None
    return layout
