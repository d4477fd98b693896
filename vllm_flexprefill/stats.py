"""Per-step statistics of the vLLM backend, as JSON lines, for tests, the demo and benchmarks.

Off unless ``FLEXPREFILL_STATS`` names a file (not ``VLLM_``-prefixed: vLLM warns about
variables of its namespace that it does not know). Then every process of the engine
(engine core, each tensor-parallel worker) appends one line per planned step and one per
FlexPrefill layer call. The layer records need the chosen block counts on the host, a
device synchronisation per layer, which is why they are opt-in. Records:

    {"kind": "step", "pid": ..., "requests": [{"new": 512, "all": 20480, "route": "sparse"}, ...]}
        every prefill request of a step and where it was planned: "sparse" (in the layers
        the router chose, or every layer under fixed thresholds) or "dense"
    {"kind": "layer", "pid": ..., "layer": "model.layers.3.self_attn", "heads": 9,
     "requests": [{"new": 512, "all": 20480, "computed": 1234, "causal": 5678, "query_aware": 2}, ...]}
        per FlexPrefill request: key blocks computed and causal key blocks, summed over the
        layer's query heads, and how many heads took the query-aware pattern

The debug log (``VLLM_LOGGING_LEVEL=DEBUG``) says the same for people; programs read this.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib

ENV = "FLEXPREFILL_STATS"


@functools.lru_cache(maxsize=4096)
def layer_index(layer_name: str) -> int | None:
    """A decoder layer's index from the name of its attention layer, as the layer records carry
    it ("model.layers.14.self_attn.attn" -> 14): the name's one number; None where it holds
    none or several (cached: the backend asks on every layer call)."""
    numbers = [int(part) for part in layer_name.split(".") if part.isdigit()]
    return numbers[0] if len(numbers) == 1 else None


def path() -> str | None:
    """The statistics file, or None when statistics are off."""
    return os.environ.get(ENV) or None


def append(record: dict) -> None:
    """Appends one record (a line in append mode: whole lines even from several processes)."""
    target = path()
    if target is None:
        return
    line = json.dumps({**record, "pid": os.getpid()}) + "\n"
    with open(target, "a") as f:
        f.write(line)


def read(file: str | os.PathLike) -> list[dict]:
    """Every record of a statistics file (an absent file has none)."""
    p = pathlib.Path(file)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


@dataclasses.dataclass(frozen=True)
class Summary:
    """What FlexPrefill did over a set of records.

    density: computed / causal key blocks over the sparse layer calls (None if none ran).
    sparse_tokens, dense_tokens: new prompt tokens that ran FlexPrefill / the dense path.
    layer_calls: FlexPrefill layer calls.
    query_aware: share of (request, head) pairs that took the query-aware pattern.
    """

    density: float | None
    sparse_tokens: int
    dense_tokens: int
    layer_calls: int
    query_aware: float | None


def summarize(records: list[dict]) -> Summary:
    computed = causal = calls = qa = pairs = 0
    sparse_tokens = dense_tokens = 0
    for r in records:
        if r.get("kind") == "layer":
            calls += 1
            for req in r["requests"]:
                computed += req["computed"]
                causal += req["causal"]
                qa += req["query_aware"]
                pairs += r["heads"]
        elif r.get("kind") == "step":
            for req in r["requests"]:
                if req["route"] == "sparse":
                    sparse_tokens += req["new"]
                else:
                    dense_tokens += req["new"]
    return Summary(computed / causal if causal else None, sparse_tokens, dense_tokens, calls,
                   qa / pairs if pairs else None)
