"""benchmarks/fa3_lists.py's decomposition (an experiment, not the backend's path): block
lists as FlashAttention-3 paged varlen sequences, one per (query head, tile), one call per KV
head, give block-sparse attention exactly. A PyTorch reference with FA3's arguments and
bottom-right causal mask stands in for FA3."""

import importlib.util
import pathlib

import torch

from vllm_flexprefill.kernels.naive import naive_block_sparse_attention
from vllm_flexprefill.patterns.layout import BatchLayout
from vllm_flexprefill.testing import paged_cache, random_block_lists

spec = importlib.util.spec_from_file_location("fa3_lists",
                                              pathlib.Path(__file__).parents[2] / "benchmarks" / "fa3_lists.py")
fa3_lists = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fa3_lists)


def test_lists_as_paged_sequences_give_block_sparse_attention():
    torch.manual_seed(0)
    n, bs, page, hq, h, d = 301, 32, 8, 4, 2, 16  # a partial last block and last page
    layout = BatchLayout.build([n], [n], bs, "cpu")
    q, k, v = torch.randn(n, hq, d), torch.randn(n, h, d), torch.randn(n, h, d)
    key_cache, value_cache, rows = paged_cache(k, v, [n], page=page)
    seq_pages = rows[::page] // key_cache.stride(0)
    idx, cnt = random_block_lists(layout, hq, 0.4)
    assert (cnt < layout.tile_row[None, :] + 1).any() and (cnt > 2).any(), "lists with gaps"
    table, seqused = fa3_lists.tile_sequences(idx, cnt, layout.tile_row, seq_pages, n, bs, page)
    assert table.shape == (hq, layout.num_tiles, layout.max_key_blocks * bs // page)
    assert seqused[:, -1].tolist() == [(c - 1) * bs + n % bs for c in cnt[:, -1].tolist()], "the last tile's keys"
    out = torch.full_like(q, float("nan"))
    fa3_lists.lists_through(fa3_lists.reference_paged_varlen, q, key_cache, value_cache, table, seqused, bs, 0.3,
                            out)
    want = naive_block_sparse_attention(q, key_cache, value_cache, layout, idx, cnt, 0.3, k_rows=rows)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
