"""Triton kernels of ``fastprompt::clip_cross_entropy_backward`` (the CUDA path; CPU tensors
under ``TRITON_INTERPRET=1``).

``G = diag(grad_rows) · grad_logits`` is never formed. One matmul kernel computes ``A = Gᵀ X̂``
(C x D) and/or ``B = G T̂`` (N x D) with the per-row factors folded into the operand rows it loads;
a row epilogue kernel then forms the normalisation's projection in the output dtype and the
per-row dots whose sum is ``∂L/∂s`` (summed on the device: deterministic, no host
synchronisation). A product whose gradient nobody needs is skipped. Formulas: docs/math.md.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastprompt.kernels.launch import (INTERPRET, dot_precision, mma,
                                        next_pow2_between, on_input_device)
from fastprompt.kernels.row_norms import power_of_two_below, row_inv_norms

__all__ = ["clip_cross_entropy_backward"]


@triton.jit
def _grad_matmul_kernel(g_ptr, f_ptr, k_scale_ptr, k_scale_peak_ptr, k_inv_norm_ptr, out_ptr,
                        M, K, D, stride_gm, stride_gk,
                        HAS_K_SCALE: tl.constexpr, HAS_K_INV_NORM: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                        CAST_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """``out[m, :] = Σ_k g[m, k] · w_k · f[k, :]`` in float32, ``w_k`` = k_scale · k_inv_norm.

    The weighted rows of ``f`` are rounded to ``f``'s dtype before the dot, so ``k_scale`` (the
    upstream gradient, ~1/N for a mean) is divided by a power of two near its largest magnitude
    first and the accumulator multiplied back: in float16 a factor of 1/N would make the operand
    subnormal from N of about a thousand."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < M
    d_mask = dd < D
    g_rows = g_ptr + rows.to(tl.int64)[:, None] * stride_gm
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if HAS_K_SCALE:
        shrink = power_of_two_below(tl.load(k_scale_peak_ptr).to(tl.float32))
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        g = tl.load(g_rows + ks.to(tl.int64)[None, :] * stride_gk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        f = tl.load(f_ptr + ks.to(tl.int64)[:, None] * D + dd[None, :],
                    mask=k_mask[:, None] & d_mask[None, :], other=0.0)
        if HAS_K_SCALE or HAS_K_INV_NORM:
            w = tl.full((BLOCK_K,), 1.0, dtype=tl.float32)
            if HAS_K_SCALE:
                w = w * (tl.load(k_scale_ptr + ks, mask=k_mask, other=0.0) * shrink)
            if HAS_K_INV_NORM:
                w = w * tl.load(k_inv_norm_ptr + ks, mask=k_mask, other=0.0)
            f = (f.to(tl.float32) * w[:, None]).to(f_ptr.dtype.element_ty)
        acc = mma(g, f, acc, CAST_FP32, PRECISION)
    if HAS_K_SCALE:
        acc = acc * (1.0 / shrink)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + dd[None, :], acc,
             mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _grad_epilogue_kernel(acc_ptr, f_ptr, inv_norm_ptr, m_scale_ptr, scale_ptr, out_ptr,
                          row_dot_ptr, M, D,
                          NORMALIZE: tl.constexpr, HAS_M_SCALE: tl.constexpr,
                          WRITE_OUT: tl.constexpr, WRITE_DOT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """From ``P = m_scale ⊙ acc`` (rows of A or B): ``dot_m = P_m · f̂_m`` and
    ``out_m = s (P_m − dot_m f̂_m) / ‖f_m‖`` (``s P_m`` without normalisation)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    base = rows.to(tl.int64)[:, None] * D
    if HAS_M_SCALE:
        coef = tl.load(m_scale_ptr + rows, mask=row_mask, other=0.0)
    else:
        coef = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    if NORMALIZE:
        inv_norm = tl.load(inv_norm_ptr + rows, mask=row_mask, other=0.0)
    else:
        inv_norm = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    # f̂ = f / ‖f‖ is formed before any product with it, so that huge or tiny feature rows
    # (any finite nonzero row) keep every intermediate in float32's range.
    dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if WRITE_DOT or NORMALIZE:
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (dd < D)[None, :]
            acc = tl.load(acc_ptr + base + dd[None, :], mask=mask, other=0.0)
            f = tl.load(f_ptr + base + dd[None, :], mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(acc * (f * inv_norm[:, None]), axis=1)
        dot = dot * coef
    if WRITE_DOT:
        tl.store(row_dot_ptr + rows, dot, mask=row_mask)
    if WRITE_OUT:
        s = tl.load(scale_ptr).to(tl.float32)
        out_coef = s * inv_norm
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (dd < D)[None, :]
            acc = tl.load(acc_ptr + base + dd[None, :], mask=mask, other=0.0)
            out = coef[:, None] * acc
            if NORMALIZE:
                f = tl.load(f_ptr + base + dd[None, :], mask=mask, other=0.0).to(tl.float32)
                out -= dot[:, None] * (f * inv_norm[:, None])
            out = out_coef[:, None] * out
            tl.store(out_ptr + base + dd[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def epilogue_blocks(m: int, d: int) -> dict:
    """Block sizes of the row epilogue (under the interpreter: few, large blocks)."""
    if INTERPRET:
        return dict(BLOCK_M=next_pow2_between(m, 16, 64), BLOCK_D=next_pow2_between(d, 16, 512))
    return dict(BLOCK_M=16, BLOCK_D=next_pow2_between(d, 16, 128))


def matmul_config(m: int, k: int, d: int, dtype: torch.dtype) -> dict:
    """Block sizes of the product kernel. GPU: 64-wide output tiles for large M in half
    precision; float32 keeps 32 (64 spills registers on sm_80 and sm_90)."""
    if INTERPRET:
        return dict(BLOCK_M=next_pow2_between(m, 16, 64), BLOCK_K=next_pow2_between(k, 16, 128),
                    BLOCK_D=next_pow2_between(d, 16, 128))
    wide = m >= 4096 and dtype != torch.float32
    return dict(BLOCK_M=next_pow2_between(m, 16, 64), BLOCK_K=32 if dtype == torch.float32 else 64,
                BLOCK_D=next_pow2_between(d, 16, 64 if wide else 32), num_warps=4, num_stages=3)


def _product(grad_logits: torch.Tensor, features: torch.Tensor, transpose: bool,
             k_scale: Optional[torch.Tensor], k_inv_norm: Optional[torch.Tensor]) -> torch.Tensor:
    """float32 ``Gᵀ F`` (transpose) or ``G F``, with per-k weights folded into F's rows."""
    n, c = grad_logits.shape
    m, k = (c, n) if transpose else (n, c)
    d = features.shape[1]
    stride_gm, stride_gk = (1, c) if transpose else (c, 1)
    out = torch.empty((m, d), dtype=torch.float32, device=features.device)
    cfg = matmul_config(m, k, d, features.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_D"]))
    _grad_matmul_kernel[grid](
        grad_logits, features, grad_logits if k_scale is None else k_scale,
        grad_logits if k_scale is None else k_scale.abs().amax(),
        grad_logits if k_inv_norm is None else k_inv_norm, out, m, k, d, stride_gm, stride_gk,
        HAS_K_SCALE=k_scale is not None, HAS_K_INV_NORM=k_inv_norm is not None,
        CAST_FP32=INTERPRET, PRECISION=dot_precision(features.dtype), **cfg)
    return out


def _epilogue(product: torch.Tensor, features: torch.Tensor, inv_norm: Optional[torch.Tensor],
              m_scale: Optional[torch.Tensor], scale: torch.Tensor, write_out: bool,
              write_dot: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    m, d = product.shape
    out = torch.empty_like(features) if write_out else features.new_empty((0,))
    row_dot = torch.empty(m, dtype=torch.float32, device=features.device) if write_dot else None
    blocks = epilogue_blocks(m, d)
    _grad_epilogue_kernel[(triton.cdiv(m, blocks["BLOCK_M"]),)](
        product, features, product if inv_norm is None else inv_norm,
        product if m_scale is None else m_scale, scale, out if write_out else product,
        product if row_dot is None else row_dot, m, d,
        NORMALIZE=inv_norm is not None, HAS_M_SCALE=m_scale is not None, WRITE_OUT=write_out,
        WRITE_DOT=write_dot, **blocks)
    return out, row_dot


@on_input_device
def clip_cross_entropy_backward(grad_rows: torch.Tensor, grad_logits: torch.Tensor,
                                image_features: torch.Tensor, text_features: torch.Tensor,
                                scale: torch.Tensor, normalize: bool, need_image_grad: bool,
                                need_text_grad: bool, need_scale_grad: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_image, grad_text, grad_scale)`` from ``G = diag(grad_rows) grad_logits``; each is
    an empty (0,) tensor when not needed (docs/kernels.md)."""
    x, t = image_features, text_features
    x_inv = row_inv_norms(x) if normalize else None
    t_inv = row_inv_norms(t) if normalize else None
    grad_image, grad_text = x.new_empty((0,)), t.new_empty((0,))
    grad_scale = scale.new_empty((0,))
    row_dot = None
    if need_text_grad or need_scale_grad:
        # A = Gᵀ X̂: grad_rows_i / ‖x_i‖ folded into the X rows as they are loaded.
        a = _product(grad_logits, x, True, grad_rows, x_inv)
        grad_text, row_dot = _epilogue(a, t, t_inv, None, scale, need_text_grad, need_scale_grad)
    if need_image_grad:
        # B = G T̂ = diag(grad_rows) (grad_logits T̂): grad_rows applied in the epilogue.
        b = _product(grad_logits, t, False, None, t_inv)
        grad_image, _ = _epilogue(b, x, x_inv, grad_rows, scale, True, False)
    if need_scale_grad:
        grad_scale = row_dot.to(scale.dtype).sum()  # in the scale's dtype, as autograd expects
    return grad_image, grad_text, grad_scale
