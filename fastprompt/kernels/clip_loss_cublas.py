"""The cuBLAS schedule of the loss ops (``FASTPROMPT_CUDA_SCHEDULE=cublas``, the default on CUDA):
the products by ``torch.mm``, the softmax work by one Triton row pass.

Forward, over chunks of at most ``chunk_rows`` samples (one chunk of float32 products alive at a
time): ``torch.mm`` of the image rows and the class rows, both scaled by powers of two to a norm
near 1 (exact, and no product can leave float32's range), into a float32 chunk; then the forward
kernel of the fused schedule in its PRODUCTS_STORED mode, the same sweeps (log-sum-exp, every
target kind, DSPT's double softmax, ProGrad's distillation term) reading the stored products
instead of recomputing them, writes the chunk's losses and its rows of the logit gradient.

Backward: ``A = Gᵀ X̂`` and ``B = G T̂`` by ``torch.mm`` on copies of the feature matrices with
the per-row factors folded in (``grad_rows / ‖x‖`` divided by a power of two near its peak, so
that half-precision operands stay normal; ``1 / ‖t‖``), then the fused schedule's row epilogue.
Its speed follows from cuBLAS's rates at these shapes; the math is docs/math.md's.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastprompt.kernels.clip_loss_backward import grad_epilogue
from fastprompt.kernels.clip_loss_forward import (clip_loss_forward_kernel, forward_outputs,
                                                  loss_arguments, target_arguments)
from fastprompt.kernels.launch import INTERPRET, next_pow2_between
from fastprompt.kernels.row_norms import row_inv_norms

__all__ = ["clip_loss_forward", "clip_cross_entropy_backward"]

# Bytes of float32 products per chunk: small enough to stay in the L2 cache of an A100 or H100
# (40 / 50 MB) while the row pass sweeps it, large enough for cuBLAS to run at full rate.
CHUNK_BYTES = 32 << 20


@triton.jit
def _scale_rows_kernel(x_ptr, factor_ptr, out_ptr, M, D, BLOCK_M: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """``out_i = factor_i · x_i`` in float32, rounded once to ``out``'s dtype."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < M)[:, None] & (cols < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    factor = tl.load(factor_ptr + rows, mask=rows < M, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (x * factor[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def scale_rows(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``diag(factor) x`` for a contiguous M x D ``x`` and float32 ``factor`` (M,), in x's dtype."""
    m, d = x.shape
    out = torch.empty_like(x)
    block_m = next_pow2_between(m, 1, 64) if INTERPRET else 8
    block_d = next_pow2_between(d, 16, 1024 if INTERPRET else 256)
    grid = (triton.cdiv(m, block_m), triton.cdiv(d, block_d))
    _scale_rows_kernel[grid](x, factor, out, m, d, BLOCK_M=block_m, BLOCK_D=block_d)
    return out


def power_of_two_split(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(2^e, m)`` with ``values = m 2^e``, ``m`` in [0.5, 1) (0 for 0), on the device."""
    mantissa, exponent = torch.frexp(values)
    return torch.ldexp(torch.ones_like(values), exponent), mantissa


def matmul_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in float32 (cuBLAS with a float32 output for half
    inputs; float32 inputs follow torch's float32 matmul precision, as ``dot_precision`` does).
    CPU tensors (the interpreter's tests) multiply float32 copies."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.device.type == "cpu":
        return torch.mm(a.float(), b.float())
    return torch.mm(a, b, out_dtype=torch.float32)


def row_pass_config(c: int, two_products: bool) -> dict:
    """Block sizes of the row pass: tiles of 2048 logits (1024 with the distillation term, whose
    sweeps keep twice the values live), rows of up to half a tile whole, several rows per
    program for small C; 4 warps (16 or 8 values per thread and tensor)."""
    if INTERPRET:
        return dict(BLOCK_N=16, BLOCK_C=next_pow2_between(c, 16, 128))
    tile = 1024 if two_products else 2048
    block_c = next_pow2_between(c, 16, tile // 2)
    block_n = next_pow2_between(tile // block_c, 1, 32 if two_products else 64)
    return dict(BLOCK_N=block_n, BLOCK_C=block_c, num_warps=4)


def default_chunk_rows(n: int, c: int, products: int) -> int:
    """Samples per chunk: ``CHUNK_BYTES`` of float32 products, a multiple of 64 (aligned views)."""
    rows = CHUNK_BYTES // (4 * c * products)
    return max(1, min(n, rows - rows % 64 if rows >= 64 else rows))


def clip_loss_forward(image_features: torch.Tensor, text_features: torch.Tensor,
                      zeroshot_text_features: Optional[torch.Tensor], labels: torch.Tensor,
                      scale: torch.Tensor, soft_labels: Optional[torch.Tensor],
                      sample_index: Optional[torch.Tensor], smoothing: float, double_softmax: bool,
                      normalize: bool, temperature: float, compute_grad: bool, q: float = 0.0,
                      q_rows: Optional[torch.Tensor] = None, chunk_rows: Optional[int] = None):
    """The fused schedule's ``clip_loss_forward`` (same arguments and outputs) by chunks of
    ``chunk_rows`` samples (default: ``default_chunk_rows``)."""
    x, t, t0 = image_features, text_features, zeroshot_text_features
    n, c, has_kl = x.shape[0], t.shape[0], t0 is not None
    loss_rows, grad, kl_rows, grad_kl = forward_outputs(x, c, has_kl, compute_grad)
    smoothing = float(smoothing)
    target, table, table_rows = target_arguments(labels, soft_labels, sample_index, smoothing)

    # Normalising: each operand row is scaled by the power-of-two part of its inverse norm (exact)
    # and the row pass applies the rest, the mantissas, as float32 factors.
    if normalize:
        x_pow2, x_factor = power_of_two_split(row_inv_norms(x))
        class_rows = [power_of_two_split(row_inv_norms(m)) for m in ([t, t0] if has_kl else [t])]
        class_ops = [scale_rows(m, pow2) for m, (pow2, _) in zip((t, t0), class_rows)]
        class_factors = [factor for _, factor in class_rows]
    else:
        x_pow2 = x_factor = None
        class_ops, class_factors = [t], [labels]

    def ptr(tensor):  # a stand-in for pointers a specialisation never touches
        return labels if tensor is None or tensor.numel() == 0 else tensor

    rows_per_chunk = chunk_rows or default_chunk_rows(n, c, len(class_ops))
    cfg = row_pass_config(c, has_kl)
    for start in range(0, n, rows_per_chunk):
        end = min(n, start + rows_per_chunk)
        losses = loss_arguments(q, None if q_rows is None else q_rows[start:end])
        x_op = x[start:end] if x_pow2 is None else scale_rows(x[start:end], x_pow2[start:end])
        products = [matmul_float32(x_op, m.T) for m in class_ops]
        del x_op
        clip_loss_forward_kernel[(triton.cdiv(end - start, cfg["BLOCK_N"]),)](
            labels, labels, labels, labels if x_factor is None else x_factor[start:end],
            class_factors[0], class_factors[-1], scale,
            labels[start:end], labels if table_rows is None else table_rows[start:end],
            ptr(table), loss_rows[start:end], kl_rows[start:end] if has_kl else labels,
            grad[start:end] if compute_grad else labels,
            grad_kl[start:end] if compute_grad and has_kl else labels,
            end - start, c, 0, 1 if table is None else table.shape[0], smoothing,
            float(temperature), c, c, TARGET=target, DOUBLE_SOFTMAX=bool(double_softmax),
            NORMALIZE=bool(normalize), HAS_KL=has_kl, COMPUTE_GRAD=bool(compute_grad),
            BLOCK_D=16, CAST_FP32=False, PRECISION="ieee", xt_ptr=products[0],
            xt0_ptr=products[-1], PRODUCTS_STORED=True, **losses, **cfg)
        del products  # before the next chunk's: one chunk of products at a time
    return loss_rows, grad, kl_rows, grad_kl



def clip_cross_entropy_backward(grad_rows: torch.Tensor, grad_logits: torch.Tensor,
                                image_features: torch.Tensor, text_features: torch.Tensor,
                                scale: torch.Tensor, normalize: bool, need_image_grad: bool,
                                need_text_grad: bool, need_scale_grad: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fastprompt::clip_cross_entropy_backward`` with cuBLAS products (docs/kernels.md)."""
    x, t = image_features, text_features
    x_inv = row_inv_norms(x) if normalize else None
    t_inv = row_inv_norms(t) if normalize else None
    grad_image, grad_text = x.new_empty((0,)), t.new_empty((0,))
    grad_scale = scale.new_empty((0,))
    if need_text_grad or need_scale_grad:
        # A = Gᵀ diag(grad_rows / ‖x‖) X. The operand's rows have norms |grad_rows_i| / peak
        # (at most 1) and the product is multiplied back by the peak's power of two.
        peak_pow2, _ = power_of_two_split(grad_rows.abs().amax())
        weights = grad_rows / peak_pow2
        a = matmul_float32(grad_logits.T, scale_rows(x, weights if x_inv is None else weights * x_inv))
        a.mul_(peak_pow2)
        grad_text, row_dot = grad_epilogue(a, t, t_inv, None, scale, need_text_grad,
                                           need_scale_grad)
        if need_scale_grad:
            grad_scale = row_dot.to(scale.dtype).sum()  # in the scale's dtype, as autograd expects
    if need_image_grad:
        # B = diag(grad_rows) G T̂: grad_rows applied in the epilogue.
        b = matmul_float32(grad_logits, t if t_inv is None else scale_rows(t, t_inv))
        grad_image, _ = grad_epilogue(b, x, x_inv, grad_rows, scale, True, False)
    return grad_image, grad_text, grad_scale
