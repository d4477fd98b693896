"""benchmarks/loop_ceiling.py's loops against causal SDPA (Triton interpreter): the benchmark
compares their rates, so each must compute the same attention."""

import importlib.util
import pathlib

import pytest
import torch

spec = importlib.util.spec_from_file_location(
    "loop_ceiling", pathlib.Path(__file__).parents[2] / "benchmarks" / "loop_ceiling.py")
loop_ceiling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loop_ceiling)


@pytest.mark.parametrize("variant", loop_ceiling.VARIANTS)
def test_loops_equal_causal_sdpa(variant):
    torch.manual_seed(7)
    n, hq, h, d = 301, 4, 2, 32  # an odd length: a partial last tile and diagonal
    q, k, v = torch.randn(n, hq, d), torch.randn(n, h, d), torch.randn(n, h, d)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        is_causal=True).transpose(0, 1)
    for block_n in (64, 128):
        got = loop_ceiling.loop_attention(q, k, v, variant, block_n, 4, 2)  # its output starts as NaN
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
