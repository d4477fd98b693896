"""The vLLM integration: the only part of the package that imports vLLM.

``plugin.register`` is the ``vllm.general_plugins`` entry point; ``cuda.py`` holds the
GPU backend (FlashAttention for decodes and short prefills, FlexPrefill for long ones)
and ``cpu.py`` the CPU one; ``routing.py`` plans each batch once per step.
"""
