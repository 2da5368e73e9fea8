"""``fastprompt.clip_cross_entropy``: the fused prompt-tuning loss as torch custom ops.

Two ops, one schema each, every backend behind them:

* ``fastprompt::clip_cross_entropy_forward`` -> ``(loss_rows, grad_logits)``: the per-row loss
  (float32) and, when a gradient will be needed, ``∂loss_i/∂z`` (N x C, input dtype) written
  during the forward as Liger-Kernel does, so the backward is products only.
* ``fastprompt::clip_cross_entropy_backward``: from ``grad_logits`` and the upstream per-row
  gradient to the gradients of the image features, text features and scale (closed forms in
  ``KERNELS.md``: the normalisation's backward is a projection, no N x C temporary).

Their autograd is ``ClipCrossEntropyFunction`` (the forward op, then the backward op on the
saved logit gradient); the reduction stays in Python (a mean over N values), so autograd and
``torch.compile`` see it.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastprompt import _backend, reference
from fastprompt._validation import check_clip_cross_entropy_args
from fastprompt.ops._library import define_op

_EMPTY = (0,)


def _kernels(backend: str):
    if backend == "cpp":
        return (torch.ops.fastprompt_cpp.clip_cross_entropy_forward,
                torch.ops.fastprompt_cpp.clip_cross_entropy_backward)
    if backend == "triton":
        from fastprompt.kernels import clip_cross_entropy as k
        return k.clip_cross_entropy_forward, k.clip_cross_entropy_backward
    raise ValueError(f"backend: no fused kernel for {backend!r}")


def _forward_impl(image_features, text_features, labels, scale, soft_labels, sample_index,
                  smoothing, double_softmax, normalize, compute_grad, backend):
    forward, _ = _kernels(backend)
    return forward(image_features, text_features, labels, scale, soft_labels, sample_index,
                   smoothing, double_softmax, normalize, compute_grad)


def _forward_fake(image_features, text_features, labels, scale, soft_labels, sample_index,
                  smoothing, double_softmax, normalize, compute_grad, backend):
    n, c = image_features.shape[0], text_features.shape[0]
    loss_rows = image_features.new_empty((n,), dtype=torch.float32)
    grad_logits = image_features.new_empty((n, c) if compute_grad else _EMPTY)
    return loss_rows, grad_logits


clip_cross_entropy_forward = define_op(
    "clip_cross_entropy_forward(Tensor image_features, Tensor text_features, Tensor labels, "
    "Tensor scale, Tensor? soft_labels, Tensor? sample_index, float smoothing, bool double_softmax, "
    "bool normalize, bool compute_grad, str backend) -> (Tensor, Tensor)",
    _forward_impl, _forward_fake)


def _backward_impl(grad_rows, grad_logits, image_features, text_features, scale, normalize,
                   need_image_grad, need_text_grad, need_scale_grad, backend):
    _, backward = _kernels(backend)
    return backward(grad_rows, grad_logits, image_features, text_features, scale, normalize,
                    need_image_grad, need_text_grad, need_scale_grad)


def _backward_fake(grad_rows, grad_logits, image_features, text_features, scale, normalize,
                   need_image_grad, need_text_grad, need_scale_grad, backend):
    gx = torch.empty_like(image_features) if need_image_grad else image_features.new_empty(_EMPTY)
    gt = torch.empty_like(text_features) if need_text_grad else text_features.new_empty(_EMPTY)
    gs = scale.new_empty(() if need_scale_grad else _EMPTY)  # in the scale's dtype
    return gx, gt, gs


clip_cross_entropy_backward = define_op(
    "clip_cross_entropy_backward(Tensor grad_rows, Tensor grad_logits, Tensor image_features, "
    "Tensor text_features, Tensor scale, bool normalize, bool need_image_grad, "
    "bool need_text_grad, bool need_scale_grad, str backend) -> (Tensor, Tensor, Tensor)",
    _backward_impl, _backward_fake)


class ClipCrossEntropyFunction(torch.autograd.Function):
    """Autograd of ``fastprompt::clip_cross_entropy_forward``: its backward is the backward op on
    the saved logit gradient.

    An ``autograd.Function`` rather than ``torch.library.register_autograd``: the generated
    wrapper of the latter cost about 115 µs of Python per forward and as much per backward
    (measured on 2 CPU cores, N=2, C=2: 446 µs per forward+backward step against 129 µs for the
    kernels called under a plain Function), which is a tenth of the whole step at N=256, C=1000,
    D=512 on CPU and more than the kernels themselves on a GPU at that size. torch.compile
    traces it the same way (the test compiles a step with ``fullgraph=True``).
    """

    @staticmethod
    def forward(ctx, image_features, text_features, labels, scale, soft_labels, sample_index,
                smoothing, double_softmax, normalize, compute_grad, backend):
        loss_rows, grad_logits = clip_cross_entropy_forward(
            image_features, text_features, labels, scale, soft_labels, sample_index, smoothing,
            double_softmax, normalize, compute_grad, backend)
        ctx.save_for_backward(image_features, text_features, scale, grad_logits)
        ctx.normalize = normalize
        ctx.backend = backend
        ctx.mark_non_differentiable(grad_logits)
        # grad_logits is never used downstream: without this, autograd would fill an N x C zero
        # gradient for it on every backward.
        ctx.set_materialize_grads(False)
        return loss_rows, grad_logits

    @staticmethod
    def backward(ctx, grad_rows, _unused):
        if grad_rows is None:
            return (None,) * 11
        image_features, text_features, scale, grad_logits = ctx.saved_tensors
        if grad_logits.dim() != 2:
            raise RuntimeError("clip_cross_entropy: backward called, but the forward ran without "
                               "gradients (inputs did not require grad when it ran)")
        need_x, need_t, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        gx, gt, gs = clip_cross_entropy_backward(
            grad_rows.float().contiguous(), grad_logits, image_features, text_features, scale,
            ctx.normalize, need_x, need_t, need_s, ctx.backend)
        return (gx if need_x else None, gt if need_t else None, None, gs if need_s else None,
                None, None, None, None, None, None, None)


def _resolve(image_features) -> Optional[str]:
    """The backend for these inputs; None where ``image_features`` is not a tensor (validation
    then raises the TypeError that names it)."""
    if not isinstance(image_features, torch.Tensor):
        return None
    return _backend.resolve(image_features.device)


def kernel_checks_values(backend: Optional[str], image_features) -> bool:
    """The C++ kernels check the values of their inputs themselves (``clip_cross_entropy_checks``
    says which)."""
    return backend == "cpp" and image_features.dtype != torch.float64


def clip_cross_entropy(image_features, text_features, labels, scale, *, double_softmax=False,
                       smoothing=0.0, soft_labels=None, sample_index=None, normalize=True,
                       reduction="mean"):
    """Cross-entropy of CLIP logits ``scale * x̂ t̂ᵀ`` against hard or soft targets, fused.

    Args:
        image_features: N x D (cached image features; may require grad).
        text_features: C x D (the prompts' text features; may require grad).
        labels: N int64 class indices in [0, C).
        scale: the logit multiplier (``logit_scale.exp()``), a float or a 0-d tensor.
        double_softmax: DSPT's loss, cross-entropy over ``softmax(softmax(z))``.
        smoothing: ε; targets are ``(1-ε) e_y + ε r`` when ε > 0.
        soft_labels: ``r``: None for uniform, a C x C class-wise table indexed by label, or an
            M x C instance-wise table indexed by ``sample_index``. Rows sum to 1.
        sample_index: N int64 rows of an instance-wise ``soft_labels`` table.
        normalize: L2-normalise the rows of both feature matrices first (CLIP does).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (N per-row losses).

    Returns the float32 loss. Runs the Triton kernels on CUDA and the C++ kernels on CPU
    (``FASTPROMPT_BACKEND`` forces one); float64 inputs are for ``fastprompt.reference``.
    """
    backend = _resolve(image_features)
    s = check_clip_cross_entropy_args(
        image_features, text_features, labels, scale, smoothing=smoothing, soft_labels=soft_labels,
        sample_index=sample_index, normalize=normalize, reduction=reduction,
        kernel_checks_values=kernel_checks_values(backend, image_features))
    smoothing = float(smoothing)
    if backend == "reference":
        return reference.clip_cross_entropy_unchecked(
            image_features, text_features, labels, s, double_softmax, smoothing, soft_labels,
            sample_index, normalize, reduction)
    if image_features.dtype == torch.float64:
        raise TypeError(f"image_features: float64 has no fused {backend} kernel; use float32, "
                        "bfloat16 or float16, or fastprompt.reference for float64 checks")
    if smoothing == 0.0:  # hard targets: the table plays no part
        soft_labels = sample_index = None
    if soft_labels is not None:
        soft_labels = soft_labels.float().contiguous()
    if sample_index is not None:
        sample_index = sample_index.contiguous()
    compute_grad = torch.is_grad_enabled() and (
        image_features.requires_grad or text_features.requires_grad or s.requires_grad)
    loss_rows, _ = ClipCrossEntropyFunction.apply(
        image_features.contiguous(), text_features.contiguous(), labels.contiguous(), s,
        soft_labels, sample_index, smoothing, bool(double_softmax), normalize, compute_grad, backend)
    if reduction == "mean":
        return loss_rows.mean()
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows
