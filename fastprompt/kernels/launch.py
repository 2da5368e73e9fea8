"""What every Triton kernel here shares: the interpreter switch, block-size rounding, the dot's
input precision, the float32-accumulating dot."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The interpreter computes bf16/fp16 tl.dot wrongly: there the operands are cast to fp32 first
# (read once, at import, as triton itself does when @triton.jit runs).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

def next_pow2_between(n: int, low: int, high: int) -> int:
    """The power of two covering ``n``, clamped to [low, high] (tl.dot needs dims >= 16)."""
    return max(low, min(high, triton.next_power_of_2(max(int(n), 1))))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: float32 follows torch's float32 matmul precision (``ieee`` at
    "highest", the default; ``tf32`` at "high" or "medium"); half types ignore it. Read through
    ``torch.get_float32_matmul_precision``, which answers under both the legacy ``allow_tf32``
    flags and the newer ``fp32_precision`` settings (reading ``allow_tf32`` after the latter were
    set raises)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"



@triton.jit
def mma(a, b, acc, CAST_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` accumulated in float32 (operands upcast under the interpreter)."""
    if CAST_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


