"""The launch helpers every Triton kernel goes through (``kernels/launch.py``). That the ops
launch on their tensors' device: tests/ops/test_validation.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _run_python(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
        + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


@pytest.mark.parametrize("setting,expected", [
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", "tf32"),
    ("torch.backends.fp32_precision = 'tf32'", "tf32"),
    ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", "ieee"),
    ("torch.set_float32_matmul_precision('high')", "tf32"),
    ("pass", "ieee"),
])
def test_dot_precision_under_either_matmul_precision_api(setting, expected):
    # After the newer fp32_precision API was used, reading the legacy allow_tf32 flag raises, which
    # made every float32 CUDA call fail; a fresh process per setting (they are process-wide).
    out = _run_python("import torch\n" + setting + "\n"
                      "from fastprompt.kernels.launch import dot_precision\n"
                      "print(dot_precision(torch.float32), dot_precision(torch.bfloat16))")
    assert out == f"{expected} tf32"
