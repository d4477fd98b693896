"""The original FlexPrefill's documented calls, pasted from its README: the attention
function with gamma and tau positional and its keywords, and patch_model(model,
"flex_prefill", config) with its keys. Only the import line, the shapes and the device
differ (small CPU shapes); exact mode equals dense attention and SDPA."""

import pytest
import torch
import torch.nn.functional as F

README_FUNCTION = '''
import torch
from vllm_flexprefill import flex_prefill_attention

B, N, H, D = 1, 1100, 8, 64
gamma = 0.9
tau = 0.1

q = torch.randn(B, N, H, D, device="cpu", dtype=torch.bfloat16)
k = torch.randn(B, N, H // 4, D, device="cpu", dtype=torch.bfloat16)
v = torch.randn(B, N, H // 4, D, device="cpu", dtype=torch.bfloat16)

flex_prefill_output = flex_prefill_attention(
    q,
    k,
    v,
    gamma,
    tau,
    min_budget=512,
    max_budget=None,
)
'''

README_TRANSFORMERS = '''
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm_flexprefill import patch_model


tokenizer = AutoTokenizer.from_pretrained(model_path)

model = AutoModelForCausalLM.from_pretrained(
    model_path,
    torch_dtype=torch.float32,
)

flex_prefill_config =  {
    "block_size": 128,
    "flex_prefill_gamma": 0.9,
    "flex_prefill_tau": 0.1,
    "flex_prefill_min_budget": 512,
    "flex_prefill_max_budget": None,
}

patch_model(model, "flex_prefill", flex_prefill_config)

input_ids = tokenizer(prompt, return_tensors="pt", return_attention_mask=False).input_ids
output_ids = model.generate(input_ids, max_new_tokens=8)
output = tokenizer.decode(output_ids[0], skip_special_tokens=True)
'''


def sdpa(q, k, v):
    """Causal SDPA over [B, N, H, D] with grouped KV heads."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                         v.transpose(1, 2).float(), is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)


def test_the_readmes_attention_call_runs_as_written():
    torch.manual_seed(0)
    scope: dict = {}
    exec(README_FUNCTION, scope)
    out, q, k, v = (scope[n] for n in ("flex_prefill_output", "q", "k", "v"))
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # the same call in this package's form
    from vllm_flexprefill import flex_prefill_attention

    same = flex_prefill_attention(q, k, v, {"gamma": 0.9, "tau": 0.1, "min_budget": 512, "max_budget": None})
    assert torch.equal(out, same)


def test_exact_mode_in_the_readmes_form_equals_dense_and_sdpa():
    from reference import ATOL, dense_reference

    from vllm_flexprefill import flex_prefill_attention

    torch.manual_seed(1)
    q = torch.randn(2, 700, 8, 64)
    k, v = torch.randn(2, 2, 700, 2, 64)
    out, ratio = flex_prefill_attention(q, k, v, 1.0, 0.0, min_budget=10 ** 6, block_size=64,
                                        return_computational_ratio=True)
    assert ratio == 1.0
    torch.testing.assert_close(out, sdpa(q, k, v), atol=ATOL[torch.float32], rtol=0)
    packed = dense_reference(q.reshape(1400, 8, 64), k.reshape(1400, 2, 64), v.reshape(1400, 2, 64), [700] * 2,
                             [700] * 2, 64 ** -0.5)
    torch.testing.assert_close(out.reshape(1400, 8, 64), packed, atol=ATOL[torch.float32], rtol=0)


def test_the_originals_keywords():
    from vllm_flexprefill import flex_prefill_attention

    torch.manual_seed(2)
    q = torch.randn(1, 900, 8, 64)
    k, v = torch.randn(2, 1, 900, 2, 64)
    # gqa_interleave: query head h reads KV head h % H
    interleaved = flex_prefill_attention(q, k, v, 1.0, 0.0, min_budget=10 ** 6, gqa_interleave=True)
    expanded = sdpa(q, k.repeat(1, 1, 4, 1), v.repeat(1, 1, 4, 1))  # kv heads 0 1 0 1 ...
    torch.testing.assert_close(interleaved, expanded, atol=1e-4, rtol=0)
    # the original's defaults where its form leaves them out: tau 0, min_budget one block
    out, ratio = flex_prefill_attention(q, k, v, 0.5, block_size=64, return_computational_ratio=True)
    assert 0 < ratio < 1
    sparse, ratio_floor = flex_prefill_attention(q, k, v, 0.5, 0.0, None, None, block_size=64,
                                                 return_computational_ratio=True)
    assert torch.equal(out, sparse) and ratio == ratio_floor
    with pytest.raises(ValueError, match="gamma must be a number in"):
        flex_prefill_attention(q, k, v, 2.0, 0.1)
    with pytest.raises(ValueError, match="min_budget"):
        flex_prefill_attention(q, k, v, 0.9, 0.1, min_budget=-1)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("transformers")
    from synthetic import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("ref") / "tiny-llama", local_attention=True)


def test_the_readmes_transformers_snippet_runs_as_written(tiny_model):
    from synthetic import random_text

    scope = {"torch": torch, "model_path": tiny_model, "prompt": random_text(700, seed=3)}
    exec(README_TRANSFORMERS, scope)
    model = scope["model"]
    assert model.config._attn_implementation == "flex_prefill"
    assert model.config.flexprefill["gamma"] == 0.9 and model.config.flexprefill["min_budget"] == 512
    assert scope["output_ids"].shape[1] > scope["input_ids"].shape[1]


def test_patch_model_in_exact_mode_equals_sdpa(tiny_model):
    import transformers

    from vllm_flexprefill import patch_model

    sdpa_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    flex = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    patch_model(flex, "flex_prefill", {"block_size": 64, "flex_prefill_gamma": 1.0, "flex_prefill_min_budget": 10 ** 6,
                                       "flex_prefill_max_budget": None})
    ids = torch.randint(10, 150, (1, 600), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(flex(ids).logits, sdpa_model(ids).logits, atol=2e-4, rtol=1e-4)


def test_patch_model_says_what_to_use_instead():
    from vllm_flexprefill import patch_model

    class LLM:  # stands in for vllm.LLM: the original's vLLM form
        pass

    LLM.__module__ = "vllm.entrypoints.llm"
    with pytest.raises(ValueError, match='attention_backend="FLEX_PREFILL"'):
        patch_model(LLM(), "flex_prefill", {"flex_prefill_gamma": 0.9})
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="pattern 'streaming_llm' is not served here.*'flex_prefill' only"):
        patch_model(model, "streaming_llm", {})
