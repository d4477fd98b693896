"""benchmarks/ttft.py's host timing of attention layer calls: what its "host" lines rest on."""

import cProfile
import pstats
import time
import types

import ttft


class Impl:
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None):
        if layer.layer_name == "slow":
            time.sleep(0.002)
        return output


def test_layer_calls_are_timed_per_kind_and_the_method_restored():
    plan = types.SimpleNamespace(runs_sparse=lambda name: name == "slow", measures=lambda name: name == "measuring")
    md = types.SimpleNamespace(plan=plan)
    slow, fast = types.SimpleNamespace(layer_name="slow"), types.SimpleNamespace(layer_name="fast")
    measuring = types.SimpleNamespace(layer_name="measuring")
    original = Impl.forward
    with ttft.timed(Impl, "forward", lambda args: ttft.call_kind(args[0], args[5])) as times:
        impl = Impl()
        assert impl.forward(slow, 0, 0, 0, None, md, "out") == "out"
        impl.forward(fast, 0, 0, 0, None, md, "out", output_scale=None)
        impl.forward(measuring, 0, 0, 0, None, md, "out")
        impl.forward(slow, 0, 0, 0, None, None, "out")  # no FlexPrefill plan: a dense call
    assert Impl.forward is original
    assert len(times["sparse"]) == 1 and len(times["dense"]) == 2 and len(times["measure"]) == 1
    assert times["sparse"][0] >= 0.002, "the time spent inside the call is what is kept"
    assert all(t >= 0 for t in times["dense"])


def test_a_layer_and_the_forward_it_delegates_to_are_timed_apart():
    # FlexPrefill's impl calls FlashAttention's forward for dense calls: both wrapped, each
    # call lands under its own kind, the inner one inside the outer one's time
    class Outer(Impl):
        def forward(self, layer, *args, **kwargs):
            time.sleep(0.001)
            return super().forward(layer, *args, **kwargs)

    slow = types.SimpleNamespace(layer_name="slow")
    with ttft.timed(Outer, "forward", lambda args: "dense") as outer, \
            ttft.timed(Impl, "forward", lambda args: "flash_attn") as inner:
        assert Outer().forward(slow, 0, 0, 0, None, None, "out") == "out"
    assert len(outer["dense"]) == 1 and len(inner["flash_attn"]) == 1
    assert inner["flash_attn"][0] >= 0.002 and outer["dense"][0] >= inner["flash_attn"][0] + 0.001


def work_of_a_sparse_call():
    time.sleep(0.001)


def work_of_a_dense_call():
    time.sleep(0.001)


class Profiled:
    def forward(self, layer, *args):
        (work_of_a_sparse_call if layer == "sparse" else work_of_a_dense_call)()
        return layer


def test_only_the_chosen_calls_run_under_the_profiler(tmp_path):
    profiler = cProfile.Profile()
    original = Profiled.forward
    with ttft.profiled(Profiled, "forward", lambda args: args[0] == "sparse", profiler) as seen:
        impl = Profiled()
        assert impl.forward("sparse") == "sparse"
        assert impl.forward("dense") == "dense"
        impl.forward("sparse")
    assert Profiled.forward is original
    assert seen["calls"] == 2
    functions = {name: row[0] for (_, _, name), row in pstats.Stats(profiler).stats.items()}
    assert functions.get("work_of_a_sparse_call") == 2, "each chosen call is profiled"
    assert "work_of_a_dense_call" not in functions, "the other calls run without the profiler"
    head = ttft.write_host_profile(profiler, seen["calls"], 0, 12.5, {"backend": "FLEX_PREFILL",
                                                                       "profile_dir": str(tmp_path)}, 4096, 10)
    text = (tmp_path / "host-profile-FLEX_PREFILL-4096.txt").read_text()
    assert text.startswith(head) and "2 sparse layer calls" in head
    assert "work_of_a_sparse_call" in text


def test_a_prompt_without_sparse_calls_still_writes_its_profile(tmp_path):
    head = ttft.write_host_profile(cProfile.Profile(), 0, 0, 3.0, {"backend": "FLEX_PREFILL",
                                                                  "profile_dir": str(tmp_path)}, 512, 10)
    assert "0 sparse layer calls" in head and "0.0 ms" in head
    assert (tmp_path / "host-profile-FLEX_PREFILL-512.txt").read_text().startswith(head)
