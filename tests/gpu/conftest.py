"""GPU tier: needs CUDA; every test here is skipped (and reported as skipped) without it."""

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return
    reason = "needs a CUDA GPU (and TRITON_INTERPRET unset)"
    for item in items:
        item.add_marker(pytest.mark.skip(reason=reason))
