"""The Triton readers of the plans' tables (``layout/plans.py``), beside the column orders
they read: a kernel reads a table only through these."""

from __future__ import annotations

import triton
import triton.language as tl

from vllm_flexprefill.layout.plans import SparseSeqs, TailSplit

# the readers below return the columns in these orders (a change to a table's writer must
# change its reader: the import fails until it does)
assert SparseSeqs.COLUMNS == ("seq", "q_start", "q_len", "k_start", "k_len", "kb_start", "p_start")
assert TailSplit.FIELDS == ("tile", "first_block", "end_block", "split_index")
SPARSE_SEQ_WIDTH = tl.constexpr(len(SparseSeqs.COLUMNS))


@triton.jit
def sparse_seq(table, i_j):
    """Row i_j of ``SparseSeqs.table``: the sparse sequence's batch index, first query row,
    query count, first key position, key count, and its offsets in the concatenated key
    blocks and pooled maps (offsets as int64)."""
    row = table + i_j * SPARSE_SEQ_WIDTH
    return (tl.load(row), tl.load(row + 1).to(tl.int64), tl.load(row + 2), tl.load(row + 3).to(tl.int64),
            tl.load(row + 4), tl.load(row + 5).to(tl.int64), tl.load(row + 6).to(tl.int64))


@triton.jit
def segment(segments, num_segments, i_g):
    """Segment i_g of ``TailSplit.segments`` ([4, NS]): its tile (int64), first and end key
    block, and the index of its tile among the cut tiles."""
    return (tl.load(segments + i_g).to(tl.int64), tl.load(segments + num_segments + i_g),
            tl.load(segments + 2 * num_segments + i_g), tl.load(segments + 3 * num_segments + i_g))
