"""A vLLM engine with FLEX_PREFILL compiles its kernels at start-up: the first long request
after the engine is made compiles no Triton kernel and no FlashAttention-4 variant."""

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM")


def compiled_variants() -> dict[str, int]:
    """How many variants each of FlexPrefill's kernels holds in this process."""
    from vllm_flexprefill.kernels import block_lists, block_sparse_attn, gather, head_select, probe

    kernels = {"probe": probe.probe_kernel, "head_select": head_select.head_select_kernel,
               "pooled_map": block_lists.pooled_map_kernel, "block_lists": block_lists.block_lists_kernel,
               "attention": block_sparse_attn.block_sparse_attn_fwd_kernel, "gather": gather.gather_rows_kernel}
    device = torch.cuda.current_device()
    counts = {name: len(k.device_caches[device][0]) for name, k in kernels.items()}
    try:
        from vllm.vllm_flash_attn.cute.interface import _flash_attn_fwd

        counts["fa4"] = len(_flash_attn_fwd.compile_cache.cache)
    except ImportError:
        pass
    return counts


def test_the_first_long_request_compiles_nothing(tmp_path, monkeypatch):
    from synthetic import make_tiny_model, random_text
    from vllm import LLM, SamplingParams

    # the engine in this process, where the kernels' caches can be read
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    model = make_tiny_model(tmp_path / "tiny", hidden=512, heads=4, kv_heads=2)  # head_dim 128
    llm = LLM(model=model, attention_backend="FLEX_PREFILL", dtype="bfloat16", max_model_len=16384,
              max_num_batched_tokens=4096, enforce_eager=True, gpu_memory_utilization=0.3, seed=0,
              additional_config={"flexprefill": {"min_sparse_tokens": 0, "min_sparse_query_tokens": 0}})
    before = compiled_variants()
    assert before["attention"] > 0, f"start-up compiled nothing: {before}"
    # a long prompt in chunks (the second on a cached prefix, starting inside a block), and a short one
    prompts = [random_text(9000, seed=1), random_text(300, seed=2)]  # 9000 and 300 tokens
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0))
    torch.cuda.synchronize()
    assert compiled_variants() == before, "a kernel variant compiled after start-up"
