"""benchmarks/recall.py: the dense attention mass per block it measures recall against, and the
recall of a choice that keeps every block."""

import types

import recall
import torch

from vllm_flexprefill.config import FlexPrefillConfig


def keep_every_block(bs: int) -> dict:
    """One setting, "all", whose budget floor keeps every causal block of these short inputs."""
    return {"all": FlexPrefillConfig.from_dict({"min_budget": 1000000, "min_sparse_tokens": 0,
                                                "sparse_block_size": bs})}


def assert_recalls_everything(row: dict) -> None:
    """Every head keeps all its dense mass: over all queries, the final tile and the needles' tiles."""
    for key in ("recall", "final_recall", "needle_recall"):
        assert min(row[key]) > 0.999, key


def test_block_mass_is_dense_causal_attention_summed_per_key_block():
    torch.manual_seed(0)
    n, hq, hkv, d, bs = 300, 4, 2, 16, 64
    q, k = torch.randn(n, hq, d), torch.randn(n, hkv, d)
    mass = recall.block_mass(q, k, bs, scale=0.25, rows=97)  # slices that straddle tiles
    keys = k.repeat_interleave(hq // hkv, dim=1)
    scores = 0.25 * torch.einsum("qhd,khd->hqk", q, keys)
    probs = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    nb = -(-n // bs)
    want = torch.zeros(hq, nb, nb)
    for r in range(nb):
        for c in range(nb):
            want[:, r, c] = probs[:, r * bs:(r + 1) * bs, c * bs:(c + 1) * bs].sum((1, 2))
    torch.testing.assert_close(mass, want, atol=1e-4, rtol=1e-4)
    # each tile's row sums to its number of queries
    torch.testing.assert_close(mass.sum(-1)[0], torch.tensor([64.0, 64, 64, 64, 44]))


def test_a_choice_of_every_block_recalls_everything_and_needles_past_a_prefix_are_left_out():
    torch.manual_seed(1)
    n, bs = 256, 64
    q, k = torch.randn(n, 4, 32), torch.randn(n, 2, 32)
    keep_all = keep_every_block(bs)
    sample = types.SimpleNamespace(needle_spans=((70, 80), (250, 262)))
    row = recall.analyse(q, k, 0.2, keep_all, sample, needle_mass=0.01)["all"]
    assert_recalls_everything(row)
    assert row["drops"] == 0
    # as the first 128 tokens: only the first needle counts, its tile is 1
    assert recall.needle_blocks(sample, bs, 128) == [[1]]
    first = recall.analyse(q[:128], k[:128], 0.2, keep_all, sample, needle_mass=0.01)["all"]
    assert len(first["needle_recall"]) == 4
    none = recall.analyse(q[:64], k[:64], 0.2, keep_all, sample, needle_mass=0.01)["all"]
    assert none["needle_recall"] is None


def test_a_chunk_is_analysed_against_every_key_before_its_end_with_its_own_needles():
    torch.manual_seed(2)
    n, bs = 256, 64
    q, k = torch.randn(n, 4, 32), torch.randn(n, 2, 32)
    keep_all = keep_every_block(bs)
    sample = types.SimpleNamespace(needle_spans=((70, 80), (150, 160)))
    # the chunk of tokens 128-255: tiles 2 and 3, the second needle (block 2) among its queries
    chunk = recall.analyse(q[128:], k, 0.2, keep_all, sample, needle_mass=0.01)["all"]
    assert_recalls_everything(chunk)
    # its mass is the dense prompt's rows 2 and 3 (every key before the chunk's end)
    torch.testing.assert_close(recall.block_mass(q[128:], k, bs, 0.2), recall.block_mass(q, k, bs, 0.2)[:, 2:])
    # the last tile alone holds no needle token: nothing to report for the needles' tiles
    assert recall.analyse(q[192:], k, 0.2, keep_all, sample, needle_mass=0.01)["all"]["needle_recall"] is None
