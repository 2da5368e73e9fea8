"""Fixtures of the kernel tests: ``triton_device``."""
import os

import pytest
import torch

from fastprompt import _backend


@pytest.fixture
def triton_device():
    """Where the Triton kernels run: ``"cuda"``, or ``"cpu"`` under the interpreter (which
    tests/conftest.py turns on without a GPU). Skips the test without triton, or without a GPU
    when the interpreter is off."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    device = "cpu" if interpret or not torch.cuda.is_available() else "cuda"
    if not _backend.triton_available() or (device == "cpu" and not interpret):
        pytest.skip("needs triton, and TRITON_INTERPRET=1 without a GPU")
    return device
