"""``fastprompt.logits_cross_entropy`` and ``fastprompt.logits_prograd_losses``: the fused task
losses on logits the caller computed (CoCoOp's per-image logits ``z[n, c] = s <x_n, t_{n,c}>``,
DePT's linear head, anyone's own logits), as two torch ops.

* ``fastprompt::logits_cross_entropy_forward`` -> ``(loss_rows, grad_logits)``: the per-row loss
  of ``clip_cross_entropy`` (every target kind, DSPT, GCE/MAE with one exponent or one per row)
  and ``∂loss_i/∂z`` (N x C, the logits' dtype) written during the forward.
* ``fastprompt::logits_prograd_losses_forward`` -> ``(task_rows, kl_rows, grad_task_logits,
  grad_kl_logits)``: ProGrad's two losses on ``z`` and the zero-shot logits ``z⁰``, a fixed
  teacher.

The backward of both is a scale of the saved logit gradient by the upstream per-row gradient
(``LogitsCrossEntropyFunction``, ``LogitsProGradLossesFunction``): plain torch, so vmap and
torch.compile see through it. Kernels: C++ ``csrc/logits_loss.cpp``, Triton
``kernels/logits_loss.py``; contracts in docs/kernels.md, math in docs/math.md.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastprompt import reference
from fastprompt._validation import (check_logits_cross_entropy_args,
                                    check_logits_prograd_losses_args)
from fastprompt.ops._library import backend_for, define_op, refuse_float64, triton_kernel
from fastprompt.ops.clip_cross_entropy import fused_exponents, fused_targets, reduced

_EMPTY = (0,)


def _logits_fake(logits, labels, soft_labels, sample_index, smoothing, double_softmax,
                 compute_grad, q=0.0, q_rows=None):
    n = logits.shape[0]
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty(_EMPTY)
    return logits.new_empty((n,), dtype=torch.float32), grad


logits_cross_entropy_forward = define_op(
    "logits_cross_entropy_forward(Tensor logits, Tensor labels, Tensor? soft_labels, "
    "Tensor? sample_index, float smoothing, bool double_softmax, bool compute_grad, "
    "float q=0.0, Tensor? q_rows=None) -> (Tensor, Tensor)",
    _logits_fake, triton_kernel("logits_loss", "logits_cross_entropy_forward"))


def _prograd_fake(logits, zeroshot_logits, labels, soft_labels, sample_index, smoothing,
                  double_softmax, temperature, compute_grad, q=0.0, q_rows=None):
    n = logits.shape[0]
    rows = [logits.new_empty((n,), dtype=torch.float32) for _ in range(2)]
    grads = [logits.new_empty(logits.shape) if compute_grad else logits.new_empty(_EMPTY)
             for _ in range(2)]
    return rows[0], rows[1], grads[0], grads[1]


logits_prograd_losses_forward = define_op(
    "logits_prograd_losses_forward(Tensor logits, Tensor zeroshot_logits, Tensor labels, "
    "Tensor? soft_labels, Tensor? sample_index, float smoothing, bool double_softmax, "
    "float temperature, bool compute_grad, float q=0.0, Tensor? q_rows=None) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    _prograd_fake, triton_kernel("logits_loss", "logits_prograd_losses_forward"))


def _weighted(grad_logits: Tensor, grad_rows: Tensor) -> Tensor:
    """``diag(grad_rows) grad_logits`` in the logits' dtype: the product taken in float32 (type
    promotion with the float32 per-row gradient) and rounded once."""
    return grad_logits * grad_rows.float()[:, None]


def _missing_gradient(name: str, grad_logits: Tensor) -> None:
    if grad_logits.dim() != 2:
        raise RuntimeError(f"{name}: backward called, but the forward ran without gradients "
                           "(logits did not require grad when it ran)")


class LogitsCrossEntropyFunction(torch.autograd.Function):
    """Autograd of ``fastprompt::logits_cross_entropy_forward``: the backward scales the saved
    logit gradient by the upstream gradient of each row's loss."""

    @staticmethod
    def forward(ctx, logits, labels, soft_labels, sample_index, smoothing, double_softmax,
                compute_grad, q, q_rows):
        loss_rows, grad_logits = logits_cross_entropy_forward(
            logits, labels, soft_labels, sample_index, smoothing, double_softmax, compute_grad,
            q, q_rows)
        ctx.save_for_backward(grad_logits)
        ctx.mark_non_differentiable(grad_logits)
        ctx.set_materialize_grads(False)  # no N x C zero gradient for the unused output
        return loss_rows, grad_logits

    @staticmethod
    def backward(ctx, grad_rows, _unused):
        if grad_rows is None:
            return (None,) * 9
        (grad_logits,) = ctx.saved_tensors
        _missing_gradient("logits_cross_entropy", grad_logits)
        return (_weighted(grad_logits, grad_rows).to(grad_logits.dtype),) + (None,) * 8


class LogitsProGradLossesFunction(torch.autograd.Function):
    """Autograd of ``fastprompt::logits_prograd_losses_forward``: ``a_i G_task + b_i G_kl`` from
    the upstream per-row gradients of the two losses (either may be absent); the zero-shot
    logits get none."""

    @staticmethod
    def forward(ctx, logits, zeroshot_logits, labels, soft_labels, sample_index, smoothing,
                double_softmax, temperature, compute_grad, q, q_rows):
        outputs = logits_prograd_losses_forward(
            logits, zeroshot_logits, labels, soft_labels, sample_index, smoothing,
            double_softmax, temperature, compute_grad, q, q_rows)
        ctx.save_for_backward(outputs[2], outputs[3])
        ctx.mark_non_differentiable(outputs[2], outputs[3])
        ctx.set_materialize_grads(False)
        return outputs

    @staticmethod
    def backward(ctx, grad_task_rows, grad_kl_rows, _unused_task, _unused_kl):
        if grad_task_rows is None and grad_kl_rows is None:
            return (None,) * 11
        grad_task, grad_kl = ctx.saved_tensors
        _missing_gradient("logits_prograd_losses", grad_task)
        if grad_kl_rows is None:
            grad = _weighted(grad_task, grad_task_rows)
        elif grad_task_rows is None:
            grad = _weighted(grad_kl, grad_kl_rows)
        else:
            grad = torch.addcmul(_weighted(grad_task, grad_task_rows), grad_kl,
                                 grad_kl_rows.float()[:, None])
        return (grad.to(grad_task.dtype),) + (None,) * 10


def logits_cross_entropy(logits: Tensor, labels: Tensor, *, double_softmax: bool = False,
                         smoothing: float = 0.0, soft_labels: Optional[Tensor] = None,
                         sample_index: Optional[Tensor] = None, reduction: str = "mean",
                         loss: str = "ce", q=0.5) -> Tensor:
    """The fused loss of ``clip_cross_entropy`` on logits the caller computed.

    Args:
        logits: N x C (float32, bfloat16 or float16; float64 is for ``fastprompt.reference``),
            finite; may require grad (the gradient flows to them, in their dtype).
        labels: N int64 class indices in [0, C).
        double_softmax, smoothing, soft_labels, sample_index, reduction, loss, q: exactly as in
            ``clip_cross_entropy``: DSPT's double softmax, every ATLaS target kind (hard, label
            smoothing, a C x C class-wise table indexed by label, an M x C instance-wise table
            indexed by ``sample_index``), cross-entropy, GCE or MAE, with ``q`` one exponent or
            an N tensor of one per row (0: that row's loss is cross-entropy).

    Returns the float32 loss (N values for ``reduction="none"``). The logit gradient is written
    during the forward; the backward scales it by the upstream gradient of each row. Runs the
    Triton kernel on CUDA and the C++ kernel on CPU (``FASTPROMPT_BACKEND`` forces one).
    Validation (one host synchronisation at most, switchable): docs/kernels.md.
    """
    backend = backend_for(logits.device) if isinstance(logits, torch.Tensor) else None
    choice = check_logits_cross_entropy_args(
        logits, labels, smoothing=smoothing, soft_labels=soft_labels, sample_index=sample_index,
        reduction=reduction, loss=loss, q=q, kernel_checks_values=backend == "cpp")
    smoothing = float(smoothing)
    if backend == "reference":
        return reference.logits_cross_entropy_unchecked(
            logits, labels, double_softmax, smoothing, soft_labels, sample_index, reduction,
            choice.q, choice.q_rows)
    refuse_float64(backend, logits.dtype, "logits")
    soft_labels, sample_index = fused_targets(smoothing, soft_labels, sample_index)
    q, q_rows = fused_exponents(choice)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss_rows, _ = LogitsCrossEntropyFunction.apply(
        logits.contiguous(), labels.contiguous(), soft_labels, sample_index, smoothing,
        bool(double_softmax), compute_grad, q, q_rows)
    return reduced(loss_rows, reduction)


def logits_prograd_losses(logits: Tensor, zeroshot_logits: Tensor, labels: Tensor, *,
                          temperature: float = 1.0, double_softmax: bool = False,
                          smoothing: float = 0.0, soft_labels: Optional[Tensor] = None,
                          sample_index: Optional[Tensor] = None, loss: str = "ce",
                          q=0.5) -> tuple[Tensor, Tensor]:
    """ProGrad's task and distillation losses on logits the caller computed, fused.

    Args:
        logits: N x C, the prompt's logits ``z`` (may require grad).
        zeroshot_logits: N x C, zero-shot CLIP's logits ``z⁰`` for the same rows and classes, in
            the dtype of ``logits``: a fixed teacher, no gradient flows into it.
        labels, temperature, double_softmax, smoothing, soft_labels, sample_index, loss, q: as
            in ``prograd_losses``.

    Returns ``(task_loss, kl_loss)``, float32 means over the rows, with
    ``kl_loss = mean_i -τ² Σ_c softmax(z⁰_i/τ)_c log softmax(z_i/τ)_c`` (its logit gradient
    ``τ (softmax(z/τ) - softmax(z⁰/τ))``). Feed them to ``prograd_backward``.
    """
    backend = backend_for(logits.device) if isinstance(logits, torch.Tensor) else None
    temperature, choice = check_logits_prograd_losses_args(
        logits, zeroshot_logits, labels, temperature=temperature, smoothing=smoothing,
        soft_labels=soft_labels, sample_index=sample_index, loss=loss, q=q,
        kernel_checks_values=backend == "cpp")
    smoothing = float(smoothing)
    if backend == "reference":
        return reference.logits_prograd_losses_unchecked(
            logits, zeroshot_logits, labels, temperature, double_softmax, smoothing, soft_labels,
            sample_index, choice.q, choice.q_rows)
    refuse_float64(backend, logits.dtype, "logits")
    soft_labels, sample_index = fused_targets(smoothing, soft_labels, sample_index)
    q, q_rows = fused_exponents(choice)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    task_rows, kl_rows, _, _ = LogitsProGradLossesFunction.apply(
        logits.contiguous(), zeroshot_logits.detach().contiguous(), labels.contiguous(),
        soft_labels, sample_index, smoothing, bool(double_softmax), temperature, compute_grad, q,
        q_rows)
    return task_rows.mean(), kl_rows.mean()
