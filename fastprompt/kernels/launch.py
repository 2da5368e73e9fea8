"""What every Triton kernel here shares: the interpreter switch, the notional SM count launch
shapes are sized for, block-size rounding, the dot's input precision, the float32-accumulating
dot, and the device guard around launches."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# The interpreter computes bf16/fp16 tl.dot wrongly: there the operands are cast to fp32 first
# (read once, at import, as triton itself does when its decorator runs).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# The notional GPU the launch shapes are sized for: H100 SXM's 132 SMs. A fixed number rather
# than the device's, so that a shape always gets the same schedule (and bitwise the same result)
# on any machine.
SM_COUNT = 132


def next_pow2_between(n: int, low: int, high: int) -> int:
    """The power of two covering ``n``, clamped to [low, high] (tl.dot needs dims >= 16)."""
    return max(low, min(high, triton.next_power_of_2(max(int(n), 1))))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: float32 follows torch's float32 matmul setting for CUDA (``ieee``
    by default, ``tf32`` once allowed); half types ignore it. Read through the newer
    ``torch.backends.cuda.matmul.fp32_precision``, which answers whichever API set it; the
    legacy reads (``allow_tf32``, ``get_float32_matmul_precision``) raise once the newer API was
    used, so they serve only where it does not exist."""
    if dtype != torch.float32:
        return "tf32"
    try:
        tf32 = torch.backends.cuda.matmul.fp32_precision == "tf32"
    except (AttributeError, RuntimeError):
        tf32 = torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "ieee"


def on_input_device(launcher):
    """Run ``launcher`` with its first tensor argument's CUDA device current: Triton launches on
    the current device whatever device the pointers belong to, so tensors on ``cuda:1`` under a
    current ``cuda:0`` would otherwise run on the wrong GPU."""
    @functools.wraps(launcher)
    def guarded(*args):
        first = next(a[0] if isinstance(a, (list, tuple)) else a for a in args
                     if isinstance(a, torch.Tensor) or (isinstance(a, (list, tuple)) and a))
        if not first.is_cuda:
            return launcher(*args)
        with torch.cuda.device(first.device):
            return launcher(*args)
    return guarded


@triton.jit
def mma(a, b, acc, CAST_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` accumulated in float32 (operands upcast under the interpreter)."""
    if CAST_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc
