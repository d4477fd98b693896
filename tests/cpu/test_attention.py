"""The public functional API on the CPU path: exactness, planted structure, errors."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from reference import ATOL, PLANTED_REL_ERR, dense_reference, rel_err
from synthetic import planted_inputs

from vllm_flexprefill import (
    FlexPrefillConfig,
    flex_prefill_attention,
    flex_prefill_attention_varlen,
    flex_prefill_stats,
)


def cu(lens):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def sdpa_causal(q, k, v):
    """[B, N, HQ, D] causal SDPA reference in float32 (GQA by repeating kv heads)."""
    g = q.shape[2] // k.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float().repeat_interleave(g, 1),
        v.transpose(1, 2).float().repeat_interleave(g, 1), is_causal=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_exact_mode_equals_dense_sdpa(dtype):
    torch.manual_seed(0)
    q = torch.randn(2, 333, 4, 64, dtype=dtype)
    k = torch.randn(2, 333, 2, 64, dtype=dtype)
    v = torch.randn(2, 333, 2, 64, dtype=dtype)
    # a budget covering every block, with the estimation running (min_sparse_tokens=0)
    out = flex_prefill_attention(q, k, v, {"min_budget": 333, "sparse_block_size": 32, "min_sparse_tokens": 0})
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), sdpa_causal(q, k, v), atol=ATOL[dtype], rtol=0)
    stats = flex_prefill_stats(q, k, config={"min_budget": 333, "sparse_block_size": 32, "min_sparse_tokens": 0})
    assert torch.equal(stats.density, torch.ones(2, 4))


def test_varlen_chunks_exact_mode_equals_dense():
    q_lens, k_lens = [50, 200, 1], [300, 200, 77]
    torch.manual_seed(1)
    q = torch.randn(sum(q_lens), 4, 64)
    k = torch.randn(sum(k_lens), 1, 64)
    v = torch.randn(sum(k_lens), 1, 64)
    out = torch.full_like(q, float("nan"))
    flex_prefill_attention_varlen(q, k, v, cu(q_lens), cu(k_lens),
                                  {"min_budget": 400, "sparse_block_size": 16, "min_sparse_tokens": 0},
                                  softmax_scale=0.09, out=out)
    ref = dense_reference(q, k, v, q_lens, k_lens, 0.09)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("gamma,tau", [(0.95, 0.1), (0.9, 0.0)])
def test_planted_structure_is_sparse_and_close_to_dense(gamma, tau):
    q_lens, k_lens = [2048, 1024], [2048, 3072]
    q, k, v = planted_inputs(q_lens, k_lens, 8, 4, 64, dtype=torch.float32, seed=5)
    # default-like: the default min_budget is 8 blocks (1024 tokens at block_size 128)
    cfg = FlexPrefillConfig(gamma=gamma, tau=tau, min_budget=512, sparse_block_size=64, min_sparse_tokens=0)
    out = flex_prefill_attention_varlen(q, k, v, cu(q_lens), cu(k_lens), cfg)
    ref = dense_reference(q, k, v, q_lens, k_lens, 64 ** -0.5)
    stats = flex_prefill_stats(q, k, cu(q_lens), cu(k_lens), cfg)
    assert stats.sparse == (True, True)
    assert rel_err(out, ref) < PLANTED_REL_ERR
    assert stats.density.mean() < 0.45


def test_short_sequences_run_dense_by_default():
    q = torch.randn(1, 200, 2, 64)
    k = torch.randn(1, 200, 2, 64)
    stats = flex_prefill_stats(q, k, config={"block_size": 64})  # 200 < min_sparse_tokens: dense
    assert stats.sparse == (False,)
    assert torch.equal(stats.density, torch.ones(1, 2))
    out = flex_prefill_attention(q, k, k, {"block_size": 64})
    torch.testing.assert_close(out, sdpa_causal(q, k, k), atol=1e-4, rtol=0)


def good():
    return torch.randn(1, 64, 4, 64), torch.randn(1, 64, 2, 64), torch.randn(1, 64, 2, 64)


BAD = [
    (lambda q, k, v: (q.int(), k, v), {}, "q must be one of"),
    (lambda q, k, v: (q, k.half(), v), {}, "k must match q's dtype"),
    (lambda q, k, v: (q[0], k, v), {}, r"q must be \[B, N, heads, head_dim\]"),
    (lambda q, k, v: (q, k, v[:, :32]), {}, "k and v must have the same shape"),
    (lambda q, k, v: (q[..., :48], k[..., :48], v[..., :48]), {}, "head_dim must be one of"),
    (lambda q, k, v: (q[:, :, :3], k, v), {}, "must be a multiple of the number of key/value heads"),
    (lambda q, k, v: (q[:, :32], k, v), {}, "use flex_prefill_attention_varlen"),
    (lambda q, k, v: (q, k, v), {"gamma": 0.0}, r"gamma must be a number in \(0, 1\]"),
    (lambda q, k, v: (q, k, v), {"gamma": 1.5}, r"gamma must be a number in \(0, 1\]"),
    (lambda q, k, v: (q, k, v), {"tau": -0.1}, "tau must be a finite number >= 0"),
    (lambda q, k, v: (q, k, v), {"min_budget": 512, "max_budget": 256}, "min_budget .* must not exceed max_budget"),
    (lambda q, k, v: (q, k, v), {"block_size": 100}, "sparse_block_size must be one of"),
    (lambda q, k, v: (q, k, v), {"flex_prefill_gamma": 2}, r"gamma must be a number in \(0, 1\]"),
    (lambda q, k, v: (q, k, v), {"gama": 0.9}, r"unknown flexprefill config key 'gama'; did you mean 'gamma'\? allowed keys: .*gamma"),
]


@pytest.mark.parametrize("make,settings,message", BAD)
def test_bad_input_raises_value_error_that_says_what_is_allowed(make, settings, message):
    q, k, v = make(*good())
    with pytest.raises(ValueError, match=message):
        flex_prefill_attention(q, k, v, settings)


def test_bad_softmax_scale_raises_value_error():
    with pytest.raises(ValueError, match="softmax_scale must be a positive number"):
        flex_prefill_attention(*good(), softmax_scale=-1.0)


def test_bad_cu_seqlens_raise_value_error():
    q, k, v = (t[0] for t in good())
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        flex_prefill_attention_varlen(q, k, v, torch.tensor([0, 10], dtype=torch.int32), cu([64]))
    with pytest.raises(ValueError, match="need 0 < q_len <= k_len"):
        flex_prefill_attention_varlen(q, k[:32], v[:32], cu([64]), cu([32]))
    with pytest.raises(ValueError, match="1-D int32/int64"):
        flex_prefill_attention_varlen(q, k, v, torch.tensor([0.0, 64.0]), cu([64]))
