"""Inverse row norms of a feature matrix, the normalisation the loss kernels fold into their
products."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastprompt.kernels.launch import INTERPRET, next_pow2_between


@triton.jit
def _row_inv_norm_kernel(x_ptr, out_ptr, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    base = x_ptr + rows.to(tl.int64)[:, None] * D
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(base + cols[None, :], mask=row_mask[:, None] & (cols < D)[None, :], other=0.0)
        x = x.to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    sumsq = tl.where(row_mask, sumsq, 1.0)  # padding rows: keep the interpreter quiet
    tl.store(out_ptr + rows, 1.0 / tl.sqrt(sumsq), mask=row_mask)


def row_inv_norms(x: torch.Tensor) -> torch.Tensor:
    """``1 / ‖x_i‖`` of each row of a contiguous M x D matrix, float32 (M,)."""
    m, d = x.shape
    out = torch.empty(m, dtype=torch.float32, device=x.device)
    block_m = next_pow2_between(m, 16, 64) if INTERPRET else 16
    block_d = next_pow2_between(d, 16, 512 if INTERPRET else 256)
    _row_inv_norm_kernel[(triton.cdiv(m, block_m),)](x, out, m, d, BLOCK_M=block_m, BLOCK_D=block_d)
    return out
