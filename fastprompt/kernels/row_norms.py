"""Inverse row norms of a feature matrix, the normalisation the loss kernels fold into their
products."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastprompt.kernels.launch import INTERPRET, next_pow2_between


@triton.jit
def power_of_two_below(m):
    """``1/p`` for a power of two ``p`` near the non-negative float32 ``m`` (``m/p`` in [0.5, 1),
    up to 4 at the top of the range), from its exponent bits: multiplying by it is exact."""
    exponent = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return ((tl.minimum(tl.maximum(253 - exponent, 1), 254) << 23).to(tl.float32, bitcast=True))


@triton.jit
def _row_norms_kernel(x_ptr, inv_norm_ptr, scaled_ptr, M, D, WRITE_SCALED: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row: ``1/‖x‖`` with the sum of squares taken over ``x / 2^e`` (``2^e`` near the row's
    largest magnitude), so no finite nonzero row overflows or underflows it. WRITE_SCALED: also
    write ``x / 2^e`` (exact) and return the inverse norm of that scaled row instead."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    offs = rows.to(tl.int64)[:, None] * D
    peak = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + offs + cols[None, :], mask=row_mask[:, None] & (cols < D)[None, :],
                    other=0.0)
        peak = tl.maximum(peak, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    shrink = power_of_two_below(peak)  # 1 / 2^e
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + offs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = x * shrink[:, None]
        sumsq += tl.sum(x * x, axis=1)
        if WRITE_SCALED:
            tl.store(scaled_ptr + offs + cols[None, :], x.to(scaled_ptr.dtype.element_ty), mask=mask)
    sumsq = tl.where(row_mask, sumsq, 1.0)  # padding rows: keep the interpreter quiet
    inv = 1.0 / tl.sqrt(sumsq)
    if not WRITE_SCALED:
        inv = inv * shrink
    tl.store(inv_norm_ptr + rows, inv, mask=row_mask)


def row_norm_blocks(m: int, d: int) -> dict:
    """Block sizes of the row norm kernel (under the interpreter: few, large blocks)."""
    if INTERPRET:
        return dict(BLOCK_M=next_pow2_between(m, 16, 64), BLOCK_D=next_pow2_between(d, 16, 512))
    return dict(BLOCK_M=16, BLOCK_D=next_pow2_between(d, 16, 256))


def _launch(x: torch.Tensor, scaled):
    m, d = x.shape
    inv = torch.empty(m, dtype=torch.float32, device=x.device)
    blocks = row_norm_blocks(m, d)
    _row_norms_kernel[(triton.cdiv(m, blocks["BLOCK_M"]),)](
        x, inv, x if scaled is None else scaled, m, d, WRITE_SCALED=scaled is not None, **blocks)
    return inv


def row_inv_norms(x: torch.Tensor) -> torch.Tensor:
    """``1 / ‖x_i‖`` of each row of a contiguous M x D matrix, float32 (M,)."""
    return _launch(x, None)


def scaled_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_i / 2^{e_i}, 1 / ‖x_i / 2^{e_i}‖)``: each row scaled exactly by a power of two to a
    largest magnitude near 1, and its inverse norm. The forward's class matrices go through this
    (a C x D copy), so that a product with any image row stays inside float32's range."""
    scaled = torch.empty_like(x)
    return scaled, _launch(x, scaled)
