"""The ``vllm.general_plugins`` entry point: registers the FlexPrefill attention backend.

vLLM calls ``register()`` in every process (front end, engine core, each worker). It is
idempotent, cheap and CUDA-free: it registers class paths only and imports no kernels.

Selection, all three work:
    --attention-backend FLEX_PREFILL     (a registered name on vLLM >= 0.32, an alias of CUSTOM before)
    --attention-backend CUSTOM           (every supported vLLM)
    VLLM_ATTENTION_BACKEND=FLEX_PREFILL  (older guides; vLLM itself ignores the variable)
"""

from __future__ import annotations

import os

from vllm_flexprefill.backend import compat

NAME = "FLEX_PREFILL"
ENV_VAR = "VLLM_ATTENTION_BACKEND"
CUDA_CLASSES = {NAME: "vllm_flexprefill.backend.cuda.FlexPrefillBackend",
                "CUSTOM": "vllm_flexprefill.backend.cuda.FlexPrefillCustomBackend"}
CPU_CLASSES = {NAME: "vllm_flexprefill.backend.cpu.FlexPrefillCPUBackend",
               "CUSTOM": "vllm_flexprefill.backend.cpu.FlexPrefillCPUCustomBackend"}

_registered = False


def register() -> None:
    """Registers FLEX_PREFILL (where vLLM can name new backends) and CUSTOM."""
    global _registered
    if _registered:
        return
    _registered = True
    problem = compat.unsupported_reason()
    if problem is not None:
        compat.logger.error("vllm-flexprefill is not registered: %s", problem)
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, CUDA_CLASSES["CUSTOM"])
    if hasattr(AttentionBackendEnum, "register"):
        if NAME not in AttentionBackendEnum.__members__:
            register_backend(NAME, CUDA_CLASSES[NAME])
        # Enum members pickle by value; a spawned process or Ray actor unpickles the
        # config before it loads plugins. This rebuilds the member by name instead.
        AttentionBackendEnum[NAME].__reduce_ex__ = lambda protocol: (backend_member, (NAME,))
    else:
        alias_name_to_custom(AttentionBackendEnum)
    wrap_backend_selection()
    wrap_config_check()


def wrap_config_check() -> None:
    """Validates ``additional_config["flexprefill"]`` where vLLM validates its own config.

    vLLM builds its config in the caller's process (``LLM(...)``, ``vllm serve``) and lets
    the platform check it there (``check_and_update_config``), before the engine starts.
    Raising there puts the message naming the key, the value and what is allowed in the
    exception the user sees, within seconds; the engine-side check stays as a second line.
    """
    from vllm.platforms import current_platform

    platform = type(current_platform)
    original = platform.check_and_update_config
    if getattr(original, "_flexprefill", False):
        return

    def check_and_update_config(cls, vllm_config, *args, **kwargs):
        from vllm_flexprefill.backend.settings import config_from_vllm

        config_from_vllm(vllm_config)
        return original(vllm_config, *args, **kwargs)

    check_and_update_config._flexprefill = True
    platform.check_and_update_config = classmethod(check_and_update_config)


def alias_name_to_custom(enum_cls) -> None:
    """vLLM < 0.32 cannot add enum members: there FLEX_PREFILL names the CUSTOM member.

    Wraps the enum's name lookup (used by --attention-backend parsing and the selector),
    so FLEX_PREFILL works on every supported vLLM and pickles as the static CUSTOM member.
    """
    meta = type(enum_cls)
    original = meta.__getitem__
    if getattr(original, "_flexprefill", False):
        return

    def __getitem__(cls, name):
        if cls is enum_cls and isinstance(name, str) and name.upper() == NAME:
            name = "CUSTOM"
        return original(cls, name)

    __getitem__._flexprefill = True
    meta.__getitem__ = __getitem__


def backend_member(name: str):
    """Unpickling hook: the enum member, registering the plugin first if needed."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if name not in AttentionBackendEnum.__members__:
        register()
    return AttentionBackendEnum[name]


def ours(backend) -> bool:
    """True when ``backend`` (an AttentionBackendEnum member or None) is FlexPrefill."""
    if backend is None or backend.name not in (NAME, "CUSTOM"):
        return False
    try:
        return backend.get_path().startswith("vllm_flexprefill.")
    except ValueError:  # CUSTOM with nothing registered
        return False


def selection_from_env():
    """The backend named by VLLM_ATTENTION_BACKEND when it names FlexPrefill, else None."""
    value = os.environ.get(ENV_VAR, "").strip().upper()
    if value not in (NAME, "CUSTOM"):
        return None
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum[NAME]


def wrap_backend_selection() -> None:
    """Makes the current platform honour FlexPrefill.

    The CPU platform ignores any selected backend but its own; the wrapper returns our
    CPU class when FlexPrefill is selected. On every platform the wrapper also applies
    VLLM_ATTENTION_BACKEND when no backend was selected.
    """
    from vllm.platforms import current_platform

    platform = type(current_platform)
    original = platform.get_attn_backend_cls
    if getattr(original, "_flexprefill", False):
        return
    on_cpu = current_platform.is_cpu()

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        if selected_backend is None:
            selected_backend = selection_from_env()
        if ours(selected_backend) and on_cpu:
            if attn_selector_config.use_mla or attn_selector_config.use_sparse:
                raise ValueError("FLEX_PREFILL supports standard (non-MLA, non-sparse) attention only; "
                                 "choose another --attention-backend for this model")
            compat.logger.info("Using FlexPrefill attention backend (CPU).")
            return CPU_CLASSES[selected_backend.name]
        return original(selected_backend, attn_selector_config, *args, **kwargs)

    get_attn_backend_cls._flexprefill = True
    platform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
