"""benchmarks/answer_logprob.py: FlexPrefill in the named layers only, chunk by chunk, and the
dense answer read through the cache it built."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs transformers: make install, or pip install -e '.[cpu]'")

import answer_logprob as al  # noqa: E402

from vllm_flexprefill.config import FlexPrefillConfig  # noqa: E402

# every block kept: FlexPrefill must equal SDPA; LOSSY: gamma 0.5 in every layer it runs in
EXACT = FlexPrefillConfig.from_dict({"min_budget": 1000000, "min_sparse_tokens": 0, "sparse_block_size": 32,
                                     "layer_gamma": {}})
LOSSY = FlexPrefillConfig.from_dict({"min_budget": 32, "gamma": 0.5, "min_sparse_tokens": 0,
                                     "sparse_block_size": 32, "layer_gamma": {}})


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from synthetic import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("answer") / "tiny-llama", local_attention=True)
    attention = al.SparseLayers()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return al.load(loaded, attention), attention


def test_layers_are_ranges_and_anything_else_says_how_to_write_them():
    assert al.parse_layers("0-2,5") == {0, 1, 2, 5}
    assert al.parse_setting('early={"gamma": 0.9, "layers": "0-1"}')[1:] == (
        FlexPrefillConfig.from_dict({"gamma": 0.9, "min_sparse_tokens": 0}), frozenset({0, 1}))
    assert al.parse_setting("all={}")[2] is None
    for bad in ("3-1", "a", "1-"):
        with pytest.raises(ValueError, match="give ranges such as '0-13'"):
            al.parse_layers(bad)


def test_every_block_kept_reads_the_dense_answer_as_dense_does(model):
    model, attention = model
    ids = torch.randint(10, 150, (1, 611), generator=torch.Generator().manual_seed(0))
    answer, logp = al.dense_answer(model, attention, ids, 256, 6, set())
    assert len(answer) == 6
    dense = al.score_setting(model, attention, ids, 256, None, None, answer, 6, set())
    exact = al.score_setting(model, attention, ids, 256, EXACT, None, answer, 6, set())
    assert all(dense[1]) and dense[2] == answer  # the dense answer is dense's greedy answer
    torch.testing.assert_close(torch.tensor(dense[0]), torch.tensor(logp), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(exact[0]), torch.tensor(dense[0]), atol=1e-4, rtol=1e-4)
    assert exact[1] == dense[1] and exact[2] == answer
    # the cache is built chunk by chunk: one piece gives the same log-probabilities
    whole = al.score_setting(model, attention, ids, 1000, None, None, answer, 6, set())
    torch.testing.assert_close(torch.tensor(whole[0]), torch.tensor(dense[0]), atol=1e-4, rtol=1e-4)


def test_a_setting_acts_only_in_its_layers(model, monkeypatch):
    model, attention = model
    ids = torch.randint(10, 150, (1, 700), generator=torch.Generator().manual_seed(1))
    answer = al.dense_answer(model, attention, ids, 256, 4, set())[0]
    calls = []
    import vllm_flexprefill.attention as attn

    real = attn.flex_prefill_attention_varlen
    monkeypatch.setattr(attn, "flex_prefill_attention_varlen", lambda *a, **k: calls.append(1) or real(*a, **k))
    dense = al.score_setting(model, attention, ids, 256, None, None, answer, 4, set())
    assert calls == []
    one = al.score_setting(model, attention, ids, 256, LOSSY, frozenset({1}), answer, 4, set())
    assert len(calls) == 3  # layer 1 only, once per chunk (700 tokens in chunks of 256)
    every = al.score_setting(model, attention, ids, 256, LOSSY, None, answer, 4, set())
    layers = model.config.num_hidden_layers
    assert len(calls) == 3 + 3 * layers
    assert one[0] != dense[0] and every[0] != one[0], "a lossy setting changed nothing"
