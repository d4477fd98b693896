"""benchmarks/ttft.py's host timing of attention layer calls: what its "host" lines rest on."""

import importlib.util
import pathlib
import time
import types

spec = importlib.util.spec_from_file_location("ttft", pathlib.Path(__file__).parents[2] / "benchmarks" / "ttft.py")
ttft = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ttft)


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
