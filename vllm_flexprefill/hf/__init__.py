"""Hugging Face transformers: the only part of the package that imports transformers.

``attention.py`` registers FlexPrefill as an attention implementation and patches models
(``patch_model``, also importable as ``vllm_flexprefill.patch_model``).
"""


def __getattr__(name: str):
    if name in ("patch_model", "register"):
        from vllm_flexprefill.hf import attention

        return getattr(attention, name)
    raise AttributeError(f"module 'vllm_flexprefill.hf' has no attribute {name!r}")
