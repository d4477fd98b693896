"""FlexPrefill as a transformers attention implementation (hf/attention.py)."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs transformers: make install, or pip install -e '.[cpu]'")

from vllm_flexprefill.hf.attention import patch_model, register  # noqa: E402

# every block kept: FlexPrefill must equal SDPA
EXACT = {"min_budget": 1000000, "min_sparse_tokens": 0, "sparse_block_size": 64}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from synthetic import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("hf") / "tiny-llama", local_attention=True)


def load(path, attn):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    return model.eval()


def test_exact_mode_logits_and_greedy_tokens_equal_sdpa(tiny_llama):
    sdpa = load(tiny_llama, "sdpa")
    flex = patch_model(load(tiny_llama, "sdpa"), EXACT)
    ids = torch.randint(10, 150, (2, 333), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(flex(ids).logits, sdpa(ids).logits, atol=2e-4, rtol=1e-4)
        # decode steps run SDPA over the cache; the prefill ran FlexPrefill
        want = sdpa.generate(ids[:1], max_new_tokens=6, do_sample=False)
        got = flex.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_registered_name_works_in_from_pretrained(tiny_llama):
    register()
    model = load(tiny_llama, "flex_prefill")
    assert model.config._attn_implementation == "flex_prefill"
    ids = torch.randint(10, 150, (1, 200), generator=torch.Generator().manual_seed(1))
    model.config.flexprefill = EXACT
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, load(tiny_llama, "sdpa")(ids).logits, atol=2e-4, rtol=1e-4)


def test_sparse_prefill_differs_from_sdpa_only_where_blocks_were_skipped(tiny_llama):
    sdpa = load(tiny_llama, "sdpa")
    flex = patch_model(load(tiny_llama, "sdpa"), {"block_size": 32, "flex_prefill_min_budget": 64,
                                                   "min_sparse_tokens": 0})
    ids = torch.randint(10, 150, (1, 700), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = flex(ids).logits, sdpa(ids).logits
    assert not torch.allclose(a, b, atol=1e-4), "a sparse prefill that skipped blocks gave dense logits"
    # the tiny model attends locally: what was skipped carried little mass
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_a_qwen2_model_gets_the_default_gamma_unless_the_config_names_one():
    # no model has a gamma of its own (Qwen2's 0.9 lost answers on Qwen2.5: docs/quality.md)
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = transformers.Qwen2ForCausalLM(config)
    # 0.99 in the first half of the layers (layer 0 of two), as this model's layers
    settings = patch_model(model).config.flexprefill
    assert settings["gamma"] == 0.95 and settings["layer_gamma"] == {"0": 0.99}
    settings = patch_model(model, "flex_prefill", {"flex_prefill_gamma": 0.9}).config.flexprefill
    assert settings["gamma"] == 0.9 and settings["layer_gamma"] == {"0": 0.99}
    assert patch_model(model, {"gamma": 0.9, "layer_gamma": {}}).config.flexprefill["layer_gamma"] == {}


def test_bad_config_raises_the_same_clear_error():
    model = torch.nn.Module()
    model.config = transformers.LlamaConfig()
    with pytest.raises(ValueError, match=r"gamma must be a number in \(0, 1\]"):
        patch_model(model, {"flex_prefill_gamma": 2})
    with pytest.raises(ValueError, match="unknown flexprefill config key 'gama'"):
        patch_model(model, {"gama": 0.9})


def test_real_model_exact_mode_equals_sdpa():
    import checkpoints

    try:
        path = checkpoints.checkpoint("smollm2")
    except (RuntimeError, ImportError) as e:
        pytest.skip(f"SmolLM2 could not be fetched or converted here: {e}")
    sdpa = load(path, "sdpa")
    flex = patch_model(load(path, "sdpa"), EXACT)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    from ruler_tasks import Generator

    ids = torch.tensor([Generator(tokenizer).sample("niah_single_noise", 600, 0).token_ids])
    with torch.no_grad():
        torch.testing.assert_close(flex(ids).logits, sdpa(ids).logits, atol=2e-3, rtol=1e-3)


def test_each_layer_runs_its_layer_gamma(tiny_llama):
    settings = {"block_size": 32, "flex_prefill_min_budget": 32, "min_sparse_tokens": 0, "gamma": 0.5}
    plain = patch_model(load(tiny_llama, "sdpa"), settings)
    layered = patch_model(load(tiny_llama, "sdpa"), {**settings, "layer_gamma": {"1": 0.99}})
    ids = torch.randint(10, 150, (1, 700), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = plain(ids).logits, layered(ids).logits
    gammas = [layer.self_attn._flexprefill_config.gamma for layer in layered.model.layers]
    assert gammas[1] == 0.99 and set(gammas[:1] + gammas[2:]) == {0.5}
    assert not torch.allclose(a, b, atol=1e-5), "layer 1's gamma changed nothing"
    # by share of the depth: the second half of two layers is layer 1
    halves = patch_model(load(tiny_llama, "sdpa"), {**settings, "layer_gamma": {"50%-100%": 0.99}})
    with torch.no_grad():
        torch.testing.assert_close(halves(ids).logits, b, atol=0, rtol=0)
