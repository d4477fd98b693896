"""Hugging Face transformers: the only part of the package that imports transformers.

``attention.py`` registers FlexPrefill as an attention implementation and patches models.
"""
