"""FlexPrefill hyper-parameters: one frozen dataclass, validated when it is built.

The same dictionary shape is read from vLLM's ``additional_config["flexprefill"]``
(``--additional-config '{"flexprefill": {...}}'``) and accepted by the functional API.
The reference implementation's keys (``flex_prefill_gamma``, ``block_size``, ...) are
accepted as aliases.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import math
import re
from collections.abc import Mapping
from typing import Any

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
KERNELS = ("auto", "fa4", "triton")

# Reference-code keys (bytedance/FlexPrefill ``patch_model_config``) -> our field names.
REFERENCE_ALIASES = {
    "block_size": "sparse_block_size",
    "flex_prefill_gamma": "gamma",
    "flex_prefill_tau": "tau",
    "flex_prefill_min_budget": "min_budget",
    "flex_prefill_max_budget": "max_budget",
}

@dataclasses.dataclass(frozen=True)
class FlexPrefillConfig:
    """How FlexPrefill chooses the attention blocks it computes."""

    gamma: float = 0.95
    """Coverage gamma in (0, 1]: the chosen vertical blocks carry at least this share of
    the probe's vertical attention mass, and the chosen slash (block-diagonal) offsets at
    least this share of its slash mass. Higher is denser and more accurate. Every layer
    that ``layer_gamma`` does not name runs it (by default the second half of the model).
    The same for every model: the paper's 0.9 for Qwen2 lost answers that dense found on
    Qwen2.5-Coder-1.5B at 32k and 64k; 0.95 did not at 32k and lost some at 64k and 128k,
    all in the first half of the layers (docs/quality.md)."""

    tau: float = 0.1
    """Pattern threshold tau >= 0: a head whose Jensen-Shannon distance between the
    pooled estimate and the probe's true block distribution is below tau is query-aware.
    0 makes every head vertical-slash."""

    min_budget: int | None = 1024
    """Fewest tokens of vertical blocks and of slash blocks each head keeps (rounded up
    to whole blocks). None keeps only the forced sink and diagonal."""

    max_budget: int | None = None
    """Most tokens of vertical blocks and of slash blocks a head may keep (rounded up to
    whole blocks). None: no cap."""

    sparse_block_size: int = 128
    """Tile of the sparse pattern and kernels, in tokens (not vLLM's KV page size)."""

    min_sparse_tokens: int | None = None
    """Sequences whose key length (context + new tokens) is below this run dense attention.
    None (default): in vLLM, a cost model decides per layer where sparse attention is
    faster than dense (``costs.py``, docs/configuration.md); in the functional API and in
    transformers, sequences run sparse once their budget floor no longer covers them
    (more than ``max(2 * sparse_block_size, min_budget)`` keys). An integer replaces the
    cost model with this fixed rule (every layer sparse above it); 0 makes every prefill
    chunk sparse."""

    min_sparse_query_tokens: int | None = None
    """In vLLM, prefill chunks with fewer new tokens than this run dense even in a long
    sequence. None (default): the cost model decides. An integer is a fixed rule."""

    layer_gamma: Mapping[str, float] | tuple[tuple[int | float, int | float, float], ...] | None = (
        (0.0, 0.5, 0.99),)
    """gamma for some layers, e.g. ``{"14-24": 0.95}``: by index in the model (inclusive ranges
    or single indices, as strings or integers), or by share of the model's depth,
    ``{"0%-50%": 0.99}`` (the layers from 0 % of the depth up to, not including, 50 %: layers
    0-13 of 28, 0-14 of 30); every other layer uses ``gamma``. Default ``{"0%-50%": 0.99}``:
    on Qwen2.5-Coder-1.5B the answers gamma 0.95 lost at 64k and 128k were lost in the first
    half of the layers, and 0.99 there kept them at 64k and most of them at 128k
    (docs/quality.md). ``{}`` (or None) runs ``gamma`` in every layer, as the paper does.
    Read by vLLM and transformers, which know each layer's index and the model's depth
    (``for_depth``); the functional API runs one layer's settings (``for_layer``), ``gamma``
    where no index is given. Kept as ``((first, last, gamma), ...)`` or None: layer indices as
    integers, shares of the depth as floats in [0, 1]."""

    kernel: str = "auto"
    """The block-sparse attention kernel: "fa4" (vLLM's own FlashAttention-4, on Hopper),
    "triton" (this package's kernel, every CUDA GPU), or "auto" (default): FA4 where it
    can run, else Triton. On the CPU both run as their PyTorch twins."""

    def __post_init__(self) -> None:
        where = "(set it in FlexPrefillConfig or additional_config['flexprefill'])"
        if not is_gamma(self.gamma):
            raise ValueError(f"gamma must be a number in (0, 1], got {self.gamma!r} {where}")
        if (isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not self.tau >= 0.0
                or math.isinf(self.tau)):
            raise ValueError(f"tau must be a finite number >= 0, got {self.tau!r} {where}")
        for name in ("min_budget", "max_budget"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive number of tokens or None, got {value!r} {where}")
        if self.min_budget is not None and self.max_budget is not None and self.min_budget > self.max_budget:
            raise ValueError(
                f"min_budget ({self.min_budget}) must not exceed max_budget ({self.max_budget}) {where}")
        if self.sparse_block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(
                f"sparse_block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {self.sparse_block_size!r} {where}")
        object.__setattr__(self, "layer_gamma", layer_ranges(self.layer_gamma, where))
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r} {where}")
        for name in ("min_sparse_tokens", "min_sparse_query_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0 or None (the cost model decides), "
                                 f"got {value!r} {where}")

    def for_depth(self, num_layers: int) -> FlexPrefillConfig:
        """These settings in a model of ``num_layers`` layers: ``layer_gamma``'s shares of the
        depth as layer indices (a range that holds no layer drops out). Raises ValueError
        where a share names a layer an index range names too."""
        ranges, shares = _indices_and_shares(self.layer_gamma)
        if not shares:
            return self
        where = f"(in a model of {num_layers} layers; set it in FlexPrefillConfig or additional_config['flexprefill'])"
        for a, b, gamma in shares:
            first, end = math.ceil(a * num_layers - 1e-9), math.ceil(b * num_layers - 1e-9)
            if first < end:
                ranges.append((first, end - 1, gamma))
        return dataclasses.replace(self, layer_gamma=layer_ranges(ranges, where))

    def for_layer(self, index: int | None) -> FlexPrefillConfig:
        """The settings layer ``index`` runs with: its ``layer_gamma`` where one names it, else
        these (also for None, a layer of unknown index). Shares of the depth need the model's
        depth first (``for_depth``)."""
        if not self.layer_gamma or index is None:
            return self
        if self.has_depth_shares:
            raise ValueError(f"layer_gamma {self.to_dict()['layer_gamma']} names layers by share of the depth: "
                             f"call for_depth(num_layers) before for_layer, or name the layers by index")
        return _layer_settings(self, index)

    @property
    def has_depth_shares(self) -> bool:
        """Whether ``layer_gamma`` names layers by share of the depth (``for_depth`` resolves them)."""
        return bool(_indices_and_shares(self.layer_gamma)[1])

    @property
    def min_blocks(self) -> int:
        """Vertical and slash block floor per head (at least 1: the sink / the diagonal)."""
        return max(1, -(-(self.min_budget or 1) // self.sparse_block_size))

    @property
    def max_blocks(self) -> int | None:
        """Vertical and slash block cap per head, or None."""
        return None if self.max_budget is None else -(-self.max_budget // self.sparse_block_size)

    @property
    def cost_routing(self) -> bool:
        """True when the cost model decides where sparse runs (no fixed thresholds set)."""
        return self.min_sparse_tokens is None and self.min_sparse_query_tokens is None

    def long_enough(self, k_len: int) -> bool:
        """Whether a sequence of ``k_len`` keys may run sparse by length alone (see min_sparse_tokens)."""
        if self.min_sparse_tokens is None:
            return k_len > max(2 * self.sparse_block_size, self.min_budget or 0)
        return k_len >= self.min_sparse_tokens

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> FlexPrefillConfig:
        """Builds a config from a user dictionary; unknown keys are an error listing the valid ones."""
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise ValueError(
                f"the flexprefill config must be a dictionary such as {{'gamma': 0.95, 'tau': 0.1}}, "
                f"got {type(values).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = REFERENCE_ALIASES.get(key, key)
            if name not in fields:
                allowed = sorted(fields) + sorted(REFERENCE_ALIASES)
                near = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise ValueError(f"unknown flexprefill config key {key!r}; {hint}allowed keys: {', '.join(allowed)}")
            if name in kwargs:
                raise ValueError(f"flexprefill config sets {name!r} twice (as {key!r} and under another name)")
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The settings as ``from_dict`` takes them (``from_dict(cfg.to_dict()) == cfg``);
        ``layer_gamma`` as a dictionary, {} for none."""
        out = dataclasses.asdict(self)
        out["layer_gamma"] = {_range_key(a, b): g for a, b, g in self.layer_gamma or ()}
        return out


def is_gamma(value) -> bool:
    """Whether ``value`` is a coverage gamma: a number (not a bool) in (0, 1]."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value <= 1.0


def _range_key(a, b) -> str:
    """A ``layer_gamma`` key as ``from_dict`` reads it: "3", "14-24" or "0%-50%"."""
    if isinstance(a, float):
        return f"{a * 100:g}%-{b * 100:g}%"
    return f"{a}" if a == b else f"{a}-{b}"


def _indices_and_shares(ranges) -> tuple[list, list]:
    """``layer_gamma``'s triples (or None) as (layer-index ranges, shares of the depth: floats)."""
    ranges = ranges or ()
    return [r for r in ranges if not isinstance(r[0], float)], [r for r in ranges if isinstance(r[0], float)]


def layer_ranges(values, where: str = "") -> tuple[tuple[int | float, int | float, float], ...] | None:
    """``layer_gamma`` as sorted ``(first, last, gamma)``: layer indices as integers
    (inclusive, non-overlapping), shares of the depth as floats ([first, last), 0 <= first <
    last <= 1, non-overlapping; ``FlexPrefillConfig.for_depth`` turns them into indices);
    None when empty.

    values: None, a mapping ``{"14-24": 0.95, 3: 1.0, "50%-100%": 0.9}`` or such triples.
    """
    if values is None:
        return None
    example = "such as {'14-24': 0.95, '3': 1.0} or {'0%-50%': 0.99}"
    if isinstance(values, Mapping):
        items = list(values.items())
    elif isinstance(values, (list, tuple)) and all(isinstance(v, (list, tuple)) and len(v) == 3 for v in values):
        items = [((a, b), g) for a, b, g in values]
    else:
        raise ValueError(f"layer_gamma must be a dictionary of layers to gamma {example}, got {values!r} {where}")
    ranges = []
    for layers, gamma in items:
        if isinstance(layers, tuple):
            first, last = layers
        elif isinstance(layers, int) and not isinstance(layers, bool):
            first = last = layers
        elif isinstance(layers, str) and (m := re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", layers)):
            first, last = int(m[1]), int(m[2] or m[1])
        elif isinstance(layers, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*%\s*-\s*(\d+(?:\.\d*)?)\s*%\s*",
                                                             layers)):
            first, last = float(m[1]) / 100, float(m[2]) / 100
        else:
            raise ValueError(f"layer_gamma names layers by index, inclusive range or share of the depth {example}, "
                             f"got the key {layers!r} {where}")
        if isinstance(first, float) or isinstance(last, float):
            if not (isinstance(first, float) and isinstance(last, float) and 0.0 <= first < last <= 1.0):
                raise ValueError(f"layer_gamma's share of the depth {layers!r} must run from 0% up to at most "
                                 f"100%, such as '0%-50%' {where}")
        elif (not all(isinstance(x, int) and not isinstance(x, bool) for x in (first, last))
                or not 0 <= first <= last):
            raise ValueError(f"layer_gamma's range {layers!r} must run from a layer index >= 0 up {where}")
        if not is_gamma(gamma):
            raise ValueError(f"layer_gamma's gamma for layers {layers!r} must be a number in (0, 1], "
                             f"got {gamma!r} {where}")
        ranges.append((first, last, float(gamma)))
    indices, shares = (sorted(part) for part in _indices_and_shares(ranges))
    for (a0, b0, _), (a1, b1, _) in itertools.pairwise(indices):
        if a1 <= b0:
            raise ValueError(f"layer_gamma names layers {a1}-{min(b0, b1)} twice ({a0}-{b0} and {a1}-{b1}) {where}")
    for (a0, b0, _), (a1, b1, _) in itertools.pairwise(shares):
        if a1 < b0:
            raise ValueError(f"layer_gamma names the depth from {_range_key(a1, min(b0, b1))} twice "
                             f"({_range_key(a0, b0)} and {_range_key(a1, b1)}) {where}")
    return tuple(indices + shares) or None


@functools.lru_cache(maxsize=1024)
def _layer_settings(cfg: FlexPrefillConfig, index: int) -> FlexPrefillConfig:
    """One layer's settings (cached: a layer asks on every forward)."""
    gamma = next((g for a, b, g in cfg.layer_gamma if a <= index <= b), cfg.gamma)
    return dataclasses.replace(cfg, gamma=gamma, layer_gamma=None)
