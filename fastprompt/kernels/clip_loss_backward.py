"""Triton kernels of ``fastprompt::clip_cross_entropy_backward`` (the CUDA path; CPU tensors
under ``TRITON_INTERPRET=1``).

``G = diag(grad_rows) · grad_logits`` is never formed. One matmul kernel computes ``A = Gᵀ X̂``
(C x D) and/or ``B = G T̂`` (N x D) with the per-row factors folded into the operand rows it loads,
its programs in GROUP_M-swizzled order and, for a long reduction over N, in slices of float32
partial products; a row epilogue kernel then adds the slices in order, forms the normalisation's
projection in the output dtype and the per-row dots whose sum is ``∂L/∂s`` (summed on the
device: deterministic, no host synchronisation). A product whose gradient nobody needs is
skipped. Formulas: docs/math.md; schedule: docs/kernels.md.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastprompt.kernels.launch import (INTERPRET, SM_COUNT, dot_precision, mma,
                                        next_pow2_between, on_input_device)
from fastprompt.kernels.logit_gradient_layout import padded_columns
from fastprompt.kernels.row_norms import power_of_two_below, row_inv_norms

__all__ = ["clip_cross_entropy_backward", "grad_epilogue"]


@triton.jit
def _grouped_tile(pid, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                  GROUP_M: tl.constexpr):
    """``(pid_m, pid_d)`` of program ``pid`` in GROUP_M-swizzled order: consecutive programs
    cover every D tile of GROUP_M row tiles before moving on, so the row tiles of ``g`` they
    share are read from HBM about once and then hit in L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_d = tl.cdiv(D, BLOCK_D)
    per_group = GROUP_M * tiles_d
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _grad_matmul_kernel(g_ptr, f_ptr, k_scale_ptr, k_scale_peak_ptr, k_inv_norm_ptr, out_ptr,
                        M, K, D, stride_gm, stride_gk, m_load, k_per_slice,
                        HAS_K_SCALE: tl.constexpr, HAS_K_INV_NORM: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                        GROUP_M: tl.constexpr, CAST_FP32: tl.constexpr,
                        PRECISION: tl.constexpr):
    """``out[j, m, :] = Σ_{k in slice j} g[m, k] · w_k · f[k, :]`` in float32, ``w_k`` =
    k_scale · k_inv_norm; program_id(1) is the slice j of ``k_per_slice`` values of k (a
    multiple of BLOCK_K), and the caller sums the slices (one slice: the whole product).

    The weighted rows of ``f`` are rounded to ``f``'s dtype before the dot, so ``k_scale`` (the
    upstream gradient, ~1/N for a mean) is divided by a power of two near its largest magnitude
    first and the accumulator multiplied back: in float16 a factor of 1/N would make the operand
    subnormal from N of about a thousand.

    Loads of ``g`` vectorise only where their mask is constant over 16 contiguous elements: the
    k loop runs over whole tiles unmasked in k and masks only its last, partial tile, and the row
    mask (along ``g``'s contiguous axis when ``g`` is read transposed) uses ``m_load``, a bound
    the caller may round up to 16 when ``g``'s padded rows make those reads safe (rows at or
    past M are never stored)."""
    pid_m, pid_d = _grouped_tile(tl.program_id(0), M, D, BLOCK_M, BLOCK_D, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < m_load
    d_mask = dd < D
    g_rows = g_ptr + rows.to(tl.int64)[:, None] * stride_gm
    k_begin = tl.program_id(1) * k_per_slice
    k_end = tl.minimum(K, k_begin + k_per_slice)
    k_whole = k_begin + (k_end - k_begin) // BLOCK_K * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    shrink = 1.0
    if HAS_K_SCALE:
        shrink = power_of_two_below(tl.load(k_scale_peak_ptr).to(tl.float32))
    for k0 in range(k_begin, k_whole, BLOCK_K):
        acc = _accumulate_tile(acc, g_rows, f_ptr, k_scale_ptr, k_inv_norm_ptr, shrink, k0, K,
                               D, stride_gk, row_mask, dd, d_mask, False, HAS_K_SCALE,
                               HAS_K_INV_NORM, BLOCK_K, CAST_FP32, PRECISION)
    if k_whole < k_end:
        acc = _accumulate_tile(acc, g_rows, f_ptr, k_scale_ptr, k_inv_norm_ptr, shrink, k_whole,
                               K, D, stride_gk, row_mask, dd, d_mask, True, HAS_K_SCALE,
                               HAS_K_INV_NORM, BLOCK_K, CAST_FP32, PRECISION)
    if HAS_K_SCALE:
        acc = acc * (1.0 / shrink)
    out_rows = out_ptr + tl.program_id(1).to(tl.int64) * M * D + rows.to(tl.int64)[:, None] * D
    tl.store(out_rows + dd[None, :], acc, mask=(rows < M)[:, None] & d_mask[None, :])


@triton.jit
def _accumulate_tile(acc, g_rows, f_ptr, k_scale_ptr, k_inv_norm_ptr, shrink, k0, K, D,
                     stride_gk, row_mask, dd, d_mask, MASK_K: tl.constexpr,
                     HAS_K_SCALE: tl.constexpr, HAS_K_INV_NORM: tl.constexpr,
                     BLOCK_K: tl.constexpr, CAST_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + g[:, k0:k0+BLOCK_K] · diag(w) f[k0:k0+BLOCK_K]``; MASK_K for a tile past K."""
    ks = k0 + tl.arange(0, BLOCK_K)
    if MASK_K:
        k_mask = ks < K
    else:  # a constant mask keeps the g loads vectorised
        k_mask = tl.full((BLOCK_K,), 1, dtype=tl.int1)
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
    return mma(g, f, acc, CAST_FP32, PRECISION)


@triton.jit
def _grad_epilogue_kernel(acc_ptr, f_ptr, inv_norm_ptr, m_scale_ptr, scale_ptr, out_ptr,
                          row_dot_ptr, M, D, slices,
                          NORMALIZE: tl.constexpr, HAS_M_SCALE: tl.constexpr,
                          WRITE_OUT: tl.constexpr, WRITE_DOT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """From ``P = m_scale ⊙ acc`` (rows of A or B; ``acc`` the sum of ``slices`` M x D partial
    products): ``dot_m = P_m · f̂_m`` and ``out_m = s (P_m − dot_m f̂_m) / ‖f_m‖`` (``s P_m``
    without normalisation)."""
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
            acc = _slice_sum(acc_ptr, base + dd[None, :], mask, M * D, slices)
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
            acc = _slice_sum(acc_ptr, base + dd[None, :], mask, M * D, slices)
            out = coef[:, None] * acc
            if NORMALIZE:
                f = tl.load(f_ptr + base + dd[None, :], mask=mask, other=0.0).to(tl.float32)
                out -= dot[:, None] * (f * inv_norm[:, None])
            out = out_coef[:, None] * out
            tl.store(out_ptr + base + dd[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _slice_sum(acc_ptr, offs, mask, slice_stride, slices):
    """``Σ_j acc[j]`` at ``offs``, slices added in order (bitwise reproducible, no atomics)."""
    acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    for _ in range(1, slices):
        acc_ptr += slice_stride
        acc += tl.load(acc_ptr + offs, mask=mask, other=0.0)
    return acc


def epilogue_blocks(m: int, d: int) -> dict:
    """Block sizes of the row epilogue (under the interpreter: few, large blocks)."""
    if INTERPRET:
        return dict(BLOCK_M=next_pow2_between(m, 16, 64), BLOCK_D=next_pow2_between(d, 16, 512))
    return dict(BLOCK_M=16, BLOCK_D=next_pow2_between(d, 16, 128))


# The split over K: enough programs for about four waves (the last, partial wave then idles at
# most a quarter of the time), at least 8 tiles of k per slice, at most 32 slices of partials.
K_SLICE_WAVES, MIN_K_TILES_PER_SLICE, MAX_K_SLICES = 4, 8, 32


def matmul_config(m: int, k: int, d: int, dtype: torch.dtype) -> dict:
    """Block sizes of the product kernel, its GROUP_M swizzle and ``K_SLICES``, the number of
    slices the reduction over k is split into (``k_slices``). GPU: 64-wide output tiles for large
    M in half precision; float32 keeps 32 (64 spills registers on sm_80 and sm_90)."""
    if INTERPRET:
        blocks = dict(BLOCK_M=next_pow2_between(m, 16, 64), BLOCK_K=next_pow2_between(k, 16, 128),
                      BLOCK_D=next_pow2_between(d, 16, 128), GROUP_M=8)
    else:
        wide = m >= 4096 and dtype != torch.float32
        blocks = dict(BLOCK_M=next_pow2_between(m, 16, 64),
                      BLOCK_K=32 if dtype == torch.float32 else 64,
                      BLOCK_D=next_pow2_between(d, 16, 64 if wide else 32), GROUP_M=8,
                      num_warps=4, num_stages=3)
    return dict(blocks, K_SLICES=k_slices(m, k, d, blocks))


def k_slices(m: int, k: int, d: int, blocks: dict) -> int:
    """Slices of the reduction over k: 1 unless the output tiles alone leave most of
    ``SM_COUNT`` idle for a long reduction (``Gᵀ X̂`` at large N: C x D tiles, N deep; ``G T̂``
    at small N, C deep)."""
    tiles = triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(d, blocks["BLOCK_D"])
    k_tiles = triton.cdiv(k, blocks["BLOCK_K"])
    wanted = triton.cdiv(K_SLICE_WAVES * SM_COUNT, tiles)
    return max(1, min(wanted, k_tiles // MIN_K_TILES_PER_SLICE, MAX_K_SLICES))


def _product(grad_logits: torch.Tensor, features: torch.Tensor, transpose: bool,
             k_scale: Optional[torch.Tensor], k_inv_norm: Optional[torch.Tensor]) -> torch.Tensor:
    """float32 ``Gᵀ F`` (transpose) or ``G F``, with per-k weights folded into F's rows, as
    ``K_SLICES`` x M x D partial products whose sum it is (M x D for one slice)."""
    n, c = grad_logits.shape
    m, k = (c, n) if transpose else (n, c)
    d = features.shape[1]
    row_stride = grad_logits.stride(0)
    stride_gm, stride_gk = (1, row_stride) if transpose else (row_stride, 1)
    cfg = matmul_config(m, k, d, features.dtype)
    slices = cfg.pop("K_SLICES")
    k_per_slice = triton.cdiv(triton.cdiv(k, cfg["BLOCK_K"]), slices) * cfg["BLOCK_K"]
    slices = triton.cdiv(k, k_per_slice)  # none empty
    # Read transposed, g's rows run along its contiguous axis: a bound rounded up to 16 keeps
    # those loads vectorised where every row of g has its padding allocated (reading it only
    # feeds output rows that are never stored).
    m_load = m
    if transpose and row_stride >= padded_columns(c) and _allocated_rows(grad_logits) >= n:
        m_load = padded_columns(c)
    out = torch.empty((slices, m, d), dtype=torch.float32, device=features.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(d, cfg["BLOCK_D"]), slices)
    _grad_matmul_kernel[grid](
        grad_logits, features, grad_logits if k_scale is None else k_scale,
        grad_logits if k_scale is None else k_scale.abs().amax(),
        grad_logits if k_inv_norm is None else k_inv_norm, out, m, k, d, stride_gm, stride_gk,
        m_load, k_per_slice, HAS_K_SCALE=k_scale is not None,
        HAS_K_INV_NORM=k_inv_norm is not None, CAST_FP32=INTERPRET,
        PRECISION=dot_precision(features.dtype), **cfg)
    return out if slices > 1 else out[0]


def _allocated_rows(g: torch.Tensor) -> int:
    """How many whole rows of ``g``'s row stride its storage holds from its first element."""
    elements = g.untyped_storage().nbytes() // g.element_size() - g.storage_offset()
    return elements // g.stride(0)


def grad_epilogue(product: torch.Tensor, features: torch.Tensor,
                  inv_norm: Optional[torch.Tensor], m_scale: Optional[torch.Tensor],
                  scale: torch.Tensor, write_out: bool,
                  write_dot: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The row epilogue both schedules' backward end with. ``product``: A or B (M x D float32, or
    ``K_SLICES`` x M x D partial products, added in order); with ``P = m_scale ⊙ product``,
    ``out_m = s (P_m − dot_m f̂_m) / ‖f_m‖`` (``s P_m`` without ``inv_norm``) in ``features``'
    dtype, and ``row_dot``: ``dot_m = P_m · f̂_m``, whose sum is ``∂L/∂s``. ``(out, row_dot)``;
    an empty (0,) ``out`` unless ``write_out``, ``row_dot`` None unless ``write_dot``."""
    slices = product.shape[0] if product.dim() == 3 else 1
    m, d = product.shape[-2:]
    out = torch.empty_like(features) if write_out else features.new_empty((0,))
    row_dot = torch.empty(m, dtype=torch.float32, device=features.device) if write_dot else None
    blocks = epilogue_blocks(m, d)
    _grad_epilogue_kernel[(triton.cdiv(m, blocks["BLOCK_M"]),)](
        product, features, product if inv_norm is None else inv_norm,
        product if m_scale is None else m_scale, scale, out if write_out else product,
        product if row_dot is None else row_dot, m, d, slices,
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
    if grad_logits.stride(1) != 1 or grad_logits.stride(0) < grad_logits.shape[1]:
        grad_logits = grad_logits.contiguous()
    x_inv = row_inv_norms(x) if normalize else None
    t_inv = row_inv_norms(t) if normalize else None
    grad_image, grad_text = x.new_empty((0,)), t.new_empty((0,))
    grad_scale = scale.new_empty((0,))
    row_dot = None
    if need_text_grad or need_scale_grad:
        # A = Gᵀ X̂: grad_rows_i / ‖x_i‖ folded into the X rows as they are loaded.
        a = _product(grad_logits, x, True, grad_rows, x_inv)
        grad_text, row_dot = grad_epilogue(a, t, t_inv, None, scale, need_text_grad,
                                           need_scale_grad)
    if need_image_grad:
        # B = G T̂ = diag(grad_rows) (grad_logits T̂): grad_rows applied in the epilogue.
        b = _product(grad_logits, t, False, None, t_inv)
        grad_image, _ = grad_epilogue(b, x, x_inv, grad_rows, scale, True, False)
    if need_scale_grad:
        grad_scale = row_dot.to(scale.dtype).sum()  # in the scale's dtype, as autograd expects
    return grad_image, grad_text, grad_scale
