"""benchmarks/ttft.py draws every prompt of a real model's run from the prompts made for it:
engine_measure runs whole against a stand-in engine (no vLLM, no GPU)."""

import sys
import types

import pytest
import ruler
import torch
import ttft


class Engine:
    """Stands in for vllm.LLM: records the prompts it is given and, as vLLM does, stops each
    request at max_tokens or at max_model_len, whichever comes first."""

    seen: list[list[int]] = []
    made: list[int] = []

    def __init__(self, **kwargs):
        Engine.seen, Engine.made = [], []
        self.max_model_len = kwargs["max_model_len"]

    def generate(self, prompts, params, use_tqdm=False):
        Engine.seen += [p["prompt_token_ids"] for p in prompts]
        made = [min(params["max_tokens"], self.max_model_len - len(p["prompt_token_ids"])) for p in prompts]
        Engine.made += made
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=[7] * m)]) for m in made]


def run(spec, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=Engine, SamplingParams=lambda **kw: kw))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # engine_measure sets it; restored after
    # the host timing wraps vLLM's classes (tested in test_ttft_host_time.py): one more prompt per length
    monkeypatch.setattr(ttft, "host_time", lambda llm, prompt, params, backend: llm.generate([prompt], params) or {})
    return ttft.engine_measure(spec)


def real_spec(lengths, reps):
    # as real_model_variants makes them: reps + 8 distinct prompts per length
    prompts = {n: [[n, i] for i in range(reps + 8)] for n in lengths}
    return dict(model="m", lengths=lengths, max_model_len=131072, prompts=prompts, vocab_size=1000,
                backend="FLASH_ATTN", chunked=True, compilation="eager", reps=reps, profile_dir=None,
                all_lengths=lengths, decode_length=lengths[0])


def test_a_yarn_variant_without_a_32k_length_runs_whole(monkeypatch):
    # the YaRN variant of a real model holds only the lengths above its native context
    result = run(real_spec([65536, 131072], reps=3), monkeypatch)
    assert set(result["ttft_ms"]) == {65536, 131072}
    assert result["decode_ms_per_token"] is not None
    # warm-up 1, 3 timed per length, 1 host-timed per length, decode 3 x 2 generate calls on one prompt each
    assert len(Engine.seen) == 1 + 2 * 3 + 2 + 3 * 2
    drawn = [tuple(p) for p in Engine.seen[:9]]
    assert len(set(drawn)) == len(drawn), "a timed prompt was used twice (the prefix would be warm)"
    assert all(p[0] in (65536, 131072) for p in Engine.seen)


def test_decode_is_timed_over_every_token_asked_on_a_prompt_that_fills_the_context(monkeypatch):
    # a needle prompt of a 131072 variant is a little shorter than 131072: vLLM would stop its
    # decode 42 tokens in, so the prompt loses its head and all 257 tokens are generated
    spec = real_spec([131072], reps=1)
    spec["prompts"] = {131072: [list(range(131030))] * 9}
    # a stand-in clock on which each generated token takes 1 ms
    monkeypatch.setattr(ttft.time, "perf_counter", lambda: sum(Engine.made) / 1000)
    result = run(spec, monkeypatch)
    decode = [(len(p), m) for p, m in zip(Engine.seen, Engine.made) if m > 1]
    assert decode == [(131072 - 257, 257)] * 3
    assert Engine.seen[-1] == list(range(131030))[-(131072 - 257):], "the prompt's head is cut, its end kept"
    assert result["decode_ms_per_token"] == pytest.approx(1.0)


def test_random_prompts_have_the_asked_length(monkeypatch):
    spec = dict(real_spec([4096], reps=2), prompts=None, vocab_size=32000, decode_length=512)
    result = run(spec, monkeypatch)
    assert set(result["ttft_ms"]) == {4096}
    assert [len(p) for p in Engine.seen[:3]] == [4096, 4096, 4096]
    assert all(1000 <= t < 31000 for p in Engine.seen for t in p)
    assert Engine.seen[0] != Engine.seen[1], "each prompt is drawn afresh"


def test_by_layer_counts_sparse_calls_and_density_per_layer():
    layer = "model.layers.{}.self_attn.attn"
    records = [{"kind": "step", "requests": []},
               {"kind": "layer", "layer": layer.format(3), "heads": 2,
                "requests": [{"new": 1, "all": 2, "computed": 10, "causal": 40, "query_aware": 0}]},
               {"kind": "layer", "layer": layer.format(3), "heads": 2,
                "requests": [{"new": 1, "all": 2, "computed": 30, "causal": 40, "query_aware": 0},
                             {"new": 1, "all": 2, "computed": 0, "causal": 0, "query_aware": 0}]},
               {"kind": "layer", "layer": layer.format(12), "heads": 2,
                "requests": [{"new": 1, "all": 2, "computed": 5, "causal": 10, "query_aware": 1}]}]
    layers = ttft.by_layer(records)
    assert layers == {3: [2, 0.5], 12: [1, 0.5]}
    assert ttft.fmt_layers(layers) == "3:0.50(2) 12:0.50(1)"


def test_engine_names_map_to_their_settings():
    variants = [{"lengths": [32768], "prompts": None}, {"lengths": [65536, 131072], "prompts": None}]
    settings = ruler.named_json(['G90={"gamma": 0.9}'], "--settings")
    rates = ruler.named_json(['F050={"estimate_fixed": 0.5}'], "--rates")

    def specs(name):
        return ttft.engine_specs(name, variants, rates, settings, {})

    assert [s["flexprefill"] for s in specs("FLASH_ATTN")] == [None, None]
    assert [s["flexprefill"] for s in specs("FLEX_PREFILL:triton")] == [{"kernel": "triton"}] * 2
    assert [s["flexprefill"] for s in specs("G90:fa4")] == [{"gamma": 0.9, "kernel": "fa4"}] * 2
    assert [(s["flexprefill"], s["rates"]) for s in specs("F050")] == [(None, {"estimate_fixed": 0.5})] * 2
    assert [s["lengths"] for s in specs("FLEX_10")] == [[32768], [65536], [131072]]
    with pytest.raises(SystemExit, match="unknown engine 'FLEX_PREFIL'"):
        specs("FLEX_PREFIL")
    with pytest.raises(SystemExit, match="must be JSON"):
        ruler.named_json(["G={gamma: 0.9}"], "--settings")


def test_a_packages_engine_runs_the_package_of_its_folder(tmp_path, monkeypatch):
    other = tmp_path / "branch"
    (other / "vllm_flexprefill").mkdir(parents=True)
    (other / "vllm_flexprefill" / "__init__.py").write_text("BRANCH = True\n")
    packages = ttft.named_folders([f"SEG={other}"])
    (spec,) = ttft.engine_specs("SEG", [{"lengths": [4096], "prompts": None}], {}, {}, {}, packages)
    assert spec["package"] == str(other) and spec["flexprefill"] is None
    # any engine runs from the folder as ENGINE@NAME: FLEX_10 keeps its per-length budgets
    variants = [{"lengths": [32768, 65536], "prompts": None}]
    runs = ttft.engine_specs("FLEX_10@SEG", variants, {}, {}, {}, packages)
    assert [(s["package"], s["lengths"], s["flexprefill"]["max_budget"]) for s in runs] == \
        [(str(other), [32768], 819), (str(other), [65536], 1638)]
    with pytest.raises(SystemExit, match="no --packages OTHER=DIR"):
        ttft.engine_specs("FLEX_10@OTHER", variants, {}, {}, {}, packages)
    # the engine's process imports the package as vLLM loads its plugin: here, the test does
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "vllm_flexprefill", raising=False)

    class PluginLoadingEngine(Engine):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            import vllm_flexprefill  # noqa: F401

    spec = dict(real_spec([4096], reps=1), prompts=None, vocab_size=32000, decode_length=512, backend="SEG",
                package=str(other))
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=PluginLoadingEngine,
                                                                  SamplingParams=lambda **kw: kw))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setattr(ttft, "host_time", lambda llm, prompt, params, backend: {})
    monkeypatch.setattr(ttft, "what_ran", lambda llm, prompt, params: {})
    result = ttft.engine_measure(spec)
    assert result["package"] == str(other)
    assert sys.modules["vllm_flexprefill"].BRANCH


def test_a_packages_folder_without_the_package_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no vllm_flexprefill package"):
        ttft.named_folders([f"SEG={tmp_path}"])
    with pytest.raises(SystemExit, match="NAME=DIR"):
        ttft.named_folders([str(tmp_path)])
