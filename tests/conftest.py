"""Test-wide set-up. Without a CUDA GPU, Triton kernels run under the interpreter on CPU tensors:
TRITON_INTERPRET must be set before triton is first imported, hence here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
