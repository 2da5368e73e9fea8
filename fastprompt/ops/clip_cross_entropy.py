"""``fastprompt.clip_cross_entropy``: the fused prompt-tuning loss as two torch ops.

* ``fastprompt::clip_cross_entropy_forward`` -> ``(loss_rows, grad_logits)``: the per-row loss
  (float32: cross-entropy, or GCE with exponent ``q``, one per row from ``q_rows`` if given) and,
  when a gradient will be needed, ``∂loss_i/∂z`` (N x C, input dtype) written during the
  forward, so the backward is products only.
* ``fastprompt::clip_cross_entropy_backward``: from ``grad_logits`` and the upstream per-row
  gradient to the gradients of the image features, text features and scale (docs/math.md).

Their autograd is ``ClipCrossEntropyFunction``; the reduction stays in Python (a mean over N
values), so autograd and ``torch.compile`` see it. Contracts: docs/kernels.md.
"""
from __future__ import annotations

import torch

from fastprompt import reference
from fastprompt._validation import check_clip_cross_entropy_args
from fastprompt.kernels.logit_gradient_layout import logit_gradient_buffer
from fastprompt.ops._library import (backend_for, define_op, pads_logit_gradients, refuse_float64,
                                     triton_kernel)

_EMPTY = (0,)


def _forward_fake(image_features, text_features, labels, scale, soft_labels, sample_index,
                  smoothing, double_softmax, normalize, compute_grad, q=0.0, q_rows=None):
    n, c = image_features.shape[0], text_features.shape[0]
    loss_rows = image_features.new_empty((n,), dtype=torch.float32)
    grad_logits = (logit_gradient_buffer(image_features, n, c,
                                         pads_logit_gradients(image_features.device))
                   if compute_grad else image_features.new_empty(_EMPTY))
    return loss_rows, grad_logits


clip_cross_entropy_forward = define_op(
    "clip_cross_entropy_forward(Tensor image_features, Tensor text_features, Tensor labels, "
    "Tensor scale, Tensor? soft_labels, Tensor? sample_index, float smoothing, bool double_softmax, "
    "bool normalize, bool compute_grad, float q=0.0, Tensor? q_rows=None) -> (Tensor, Tensor)",
    _forward_fake, triton_kernel("loss_entry_points", "clip_cross_entropy_forward"))


def _backward_fake(grad_rows, grad_logits, image_features, text_features, scale, normalize,
                   need_image_grad, need_text_grad, need_scale_grad):
    gx = torch.empty_like(image_features) if need_image_grad else image_features.new_empty(_EMPTY)
    gt = torch.empty_like(text_features) if need_text_grad else text_features.new_empty(_EMPTY)
    gs = scale.new_empty(() if need_scale_grad else _EMPTY)  # in the scale's dtype
    return gx, gt, gs


clip_cross_entropy_backward = define_op(
    "clip_cross_entropy_backward(Tensor grad_rows, Tensor grad_logits, Tensor image_features, "
    "Tensor text_features, Tensor scale, bool normalize, bool need_image_grad, "
    "bool need_text_grad, bool need_scale_grad) -> (Tensor, Tensor, Tensor)",
    _backward_fake, triton_kernel("loss_entry_points", "clip_cross_entropy_backward"))


def _backward_vmap(info, in_dims, *args):
    """The backward op once per batch entry, outputs stacked: for the small batches that
    ``is_grads_batched`` and ``torch.func.vmap`` over ``autograd.grad`` bring (ProGrad's two);
    the text encoder's backward, where the time goes, is what gets batched."""
    outputs = []
    for b in range(info.batch_size):
        sliced = [a.select(d, b).contiguous() if d is not None else a
                  for a, d in zip(args, in_dims)]
        outputs.append(clip_cross_entropy_backward(*sliced))
    stacked = tuple(torch.stack(parts) for parts in zip(*outputs))
    return stacked, (0,) * len(stacked)


torch.library.register_vmap("fastprompt::clip_cross_entropy_backward", _backward_vmap)


class ClipCrossEntropyFunction(torch.autograd.Function):
    """Autograd of ``fastprompt::clip_cross_entropy_forward``: its backward is the backward op on
    the saved logit gradient. (An ``autograd.Function`` rather than ``register_autograd``, whose
    generated wrapper costs more Python per call than the kernels take at training sizes;
    torch.compile traces it the same way.)"""

    @staticmethod
    def forward(ctx, image_features, text_features, labels, scale, soft_labels, sample_index,
                smoothing, double_softmax, normalize, compute_grad, q, q_rows):
        loss_rows, grad_logits = clip_cross_entropy_forward(
            image_features, text_features, labels, scale, soft_labels, sample_index, smoothing,
            double_softmax, normalize, compute_grad, q, q_rows)
        ctx.save_for_backward(image_features, text_features, scale, grad_logits)
        ctx.normalize = normalize
        ctx.mark_non_differentiable(grad_logits)
        # grad_logits is never used downstream: without this, autograd would fill an N x C zero
        # gradient for it on every backward.
        ctx.set_materialize_grads(False)
        return loss_rows, grad_logits

    @staticmethod
    def backward(ctx, grad_rows, _unused):
        if grad_rows is None:
            return (None,) * 12
        image_features, text_features, scale, grad_logits = ctx.saved_tensors
        if grad_logits.dim() != 2:
            raise RuntimeError("clip_cross_entropy: backward called, but the forward ran without "
                               "gradients (inputs did not require grad when it ran)")
        need_x, need_t, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        gx, gt, gs = clip_cross_entropy_backward(
            grad_rows.float().contiguous(), grad_logits, image_features, text_features, scale,
            ctx.normalize, need_x, need_t, need_s)
        return (gx if need_x else None, gt if need_t else None, None, gs if need_s else None,
                None, None, None, None, None, None, None, None)


def fused_targets(smoothing: float, soft_labels, sample_index):
    """The target arguments as the kernels take them: no table for hard targets, a contiguous
    float32 table otherwise."""
    if smoothing == 0.0:  # hard targets: the table plays no part
        return None, None
    if soft_labels is not None:
        soft_labels = soft_labels.float().contiguous()
    if sample_index is not None:
        sample_index = sample_index.contiguous()
    return soft_labels, sample_index


def fused_exponents(choice):
    """The loss choice as the kernels take it: ``(q, q_rows)``, the per-row exponents a contiguous
    float32 tensor."""
    if choice.q_rows is None:
        return choice.q, None
    return 0.0, choice.q_rows.detach().float().contiguous()


def reduced(loss_rows, reduction):
    if reduction == "mean":
        return loss_rows.mean()
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows


def clip_cross_entropy(image_features, text_features, labels, scale, *, double_softmax=False,
                       smoothing=0.0, soft_labels=None, sample_index=None, normalize=True,
                       reduction="mean", loss="ce", q=0.5):
    """Cross-entropy (or GCE, MAE) of CLIP logits ``scale * x̂ t̂ᵀ`` against hard or soft
    targets, fused.

    Args:
        image_features: N x D (cached image features; may require grad).
        text_features: C x D (the prompts' text features; may require grad).
        labels: N int64 class indices in [0, C).
        scale: the logit multiplier (``logit_scale.exp()``), a float or a 0-d tensor.
        double_softmax: DSPT's loss, cross-entropy over ``softmax(softmax(z))``.
        smoothing: ε; targets are ``(1-ε) e_y + ε r`` when ε > 0.
        soft_labels: ``r``: None for uniform, a C x C class-wise table indexed by label, or an
            M x C instance-wise table indexed by ``sample_index``. Rows sum to 1. A fixed target:
            a table that requires grad is refused (ValueError), in every backend.
        sample_index: N int64 rows of an instance-wise ``soft_labels`` table.
        normalize: L2-normalise the rows of both feature matrices first (CLIP does); any finite
            nonzero row is accepted, however large or small.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (N per-row losses).
        loss: ``"ce"`` (cross-entropy), ``"gce"`` (generalized cross-entropy
            ``Σ_c t_c (1 - π_c^q) / q`` over the softmax, or DSPT's double softmax, ``π``) or
            ``"mae"`` (GCE at q = 1; ``1 - π_y`` for a hard label). Every target kind composes.
        q: GCE's exponent in [0, 1] (0 is cross-entropy, the limit), or an N float tensor of one
            exponent per row for ``loss="gce"``: NLPrompt's clean rows cross-entropy and the
            others MAE in one call is ``q=torch.where(clean, 0.0, 1.0)``. Ignored by ``"ce"``
            and ``"mae"``; a fixed setting (a tensor that requires grad is refused).

    Returns the float32 loss. Runs the Triton kernels on CUDA and the C++ kernels on CPU
    (``FASTPROMPT_BACKEND`` forces one); float64 inputs are for ``fastprompt.reference``.
    Validation: docs/kernels.md.
    """
    backend = backend_for(image_features.device) if isinstance(image_features, torch.Tensor) else None
    s, choice = check_clip_cross_entropy_args(
        image_features, text_features, labels, scale, smoothing=smoothing, soft_labels=soft_labels,
        sample_index=sample_index, normalize=normalize, reduction=reduction, loss=loss, q=q,
        kernel_checks_values=backend == "cpp")
    smoothing = float(smoothing)
    if backend == "reference":
        return reference.clip_cross_entropy_unchecked(
            image_features, text_features, labels, s, double_softmax, smoothing, soft_labels,
            sample_index, normalize, reduction, choice.q, choice.q_rows)
    refuse_float64(backend, image_features.dtype)
    soft_labels, sample_index = fused_targets(smoothing, soft_labels, sample_index)
    q, q_rows = fused_exponents(choice)
    compute_grad = torch.is_grad_enabled() and (
        image_features.requires_grad or text_features.requires_grad or s.requires_grad)
    loss_rows, _ = ClipCrossEntropyFunction.apply(
        image_features.contiguous(), text_features.contiguous(), labels.contiguous(), s,
        soft_labels, sample_index, smoothing, bool(double_softmax), normalize, compute_grad, q,
        q_rows)
    return reduced(loss_rows, reduction)
