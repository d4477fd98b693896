"""The ``vllm.general_plugins`` entry point: registers the FlexPrefill attention backend.

vLLM calls ``register()`` in every process (front end, engine core, each worker). It is
idempotent, cheap and CUDA-free: it registers class paths only and imports no kernels.

Selection, all three work:
    --attention-backend FLEX_PREFILL     (a registered name on vLLM >= 0.32, an alias of CUSTOM before)
    --attention-backend CUSTOM           (every supported vLLM)
    VLLM_ATTENTION_BACKEND=FLEX_PREFILL  (older guides; vLLM itself ignores the variable)
"""

from __future__ import annotations

import logging
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
    if compat.can_register_names(AttentionBackendEnum):
        if NAME not in AttentionBackendEnum.__members__:
            register_backend(NAME, CUDA_CLASSES[NAME])
        compat.pickle_by_name(AttentionBackendEnum[NAME], backend_member)
    else:
        # FLEX_PREFILL names the static CUSTOM member (and pickles as it)
        compat.alias_enum_name(AttentionBackendEnum, NAME, "CUSTOM")
    compat.wrap_platform("get_attn_backend_cls", honour_selection)
    compat.wrap_platform("check_and_update_config", check_config_first)
    compat.wrap_engine_config(check_engine_args, check_engine_config)


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
    return (compat.backend_path(backend) or "").startswith("vllm_flexprefill.")


def selection_from_env():
    """The backend named by VLLM_ATTENTION_BACKEND when it names FlexPrefill, else None."""
    value = os.environ.get(ENV_VAR, "").strip().upper()
    if value not in (NAME, "CUSTOM"):
        return None
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum[NAME]


def honour_selection(original):
    """The platform's backend choice, made to honour FlexPrefill.

    The CPU platform ignores any selected backend but its own; the wrapper returns our
    CPU class when FlexPrefill is selected. On every platform it also applies
    VLLM_ATTENTION_BACKEND when no backend was selected.
    """
    on_cpu = compat.on_cpu()

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        if selected_backend is None:
            selected_backend = selection_from_env()
        if ours(selected_backend) and on_cpu:
            if compat.wants_mla_or_sparse(attn_selector_config):
                raise ValueError("FLEX_PREFILL supports standard (non-MLA, non-sparse) attention only; "
                                 "choose another --attention-backend for this model")
            compat.say_once(logging.INFO, "Using FlexPrefill attention backend (CPU).")
            return CPU_CLASSES[selected_backend.name]
        return original(selected_backend, attn_selector_config, *args, **kwargs)

    return get_attn_backend_cls


def check_engine_args(engine_args) -> None:
    """Validates ``additional_config["flexprefill"]`` from the engine arguments, before vLLM
    builds its config: the caller gets our exception itself (key, value, what is allowed,
    where to set it), not wrapped in the config's validation error."""
    from vllm_flexprefill.backend.settings import config_from_vllm

    config_from_vllm(engine_args)


def check_engine_config(vllm_config) -> None:
    """Checks ``layer_gamma``'s shares of the depth against the model's layers once vLLM's
    config holds the model, outside the config's own validation (which would wrap our
    sentence in its own error)."""
    from vllm_flexprefill.backend.settings import config_from_vllm

    config_from_vllm(vllm_config)


def check_config_first(original):
    """The platform's config check, validating ``additional_config["flexprefill"]`` first.

    vLLM builds and checks its config in the caller's process (``LLM(...)``, ``vllm
    serve``) before the engine starts, so the exception the user sees names the key, the
    value and what is allowed, within seconds; the engine-side check stays as a second line.
    """

    def check_and_update_config(cls, vllm_config, *args, **kwargs):
        from vllm_flexprefill.backend.settings import config_from_vllm

        # shares of the depth against the model's layers: after the config is built
        # (check_engine_config), else the config's validation wraps our sentence in its own
        config_from_vllm(vllm_config, depth=False)
        return original(vllm_config, *args, **kwargs)

    return check_and_update_config
