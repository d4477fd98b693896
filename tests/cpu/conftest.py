"""CPU tier: runs anywhere. Triton kernels run in Triton's interpreter on CPU tensors."""

import os

# must be set before triton is imported by any test module
os.environ.setdefault("TRITON_INTERPRET", "1")
