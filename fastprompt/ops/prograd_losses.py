"""``fastprompt.prograd_losses``: ProGrad's two losses (Zhu et al., "Prompt-aligned Gradient for
Prompt Tuning") as one fused torch op.

``fastprompt::prograd_losses_forward`` -> ``(task_rows, kl_rows, grad_task_logits,
grad_kl_logits)``: in one pass, the task loss (``clip_cross_entropy``'s, every target option and
DSPT's double softmax), the distillation loss towards zero-shot CLIP and both logit gradients. The
zero-shot logits are recomputed from the zero-shot text features inside the pass, never stored;
they are a fixed teacher, as in the official code. Its autograd (``ProGradLossesFunction``) forms
``G = a_i Gtask + b_i Gkl`` from the upstream per-row gradients and reuses
``fastprompt::clip_cross_entropy_backward``. Math: docs/math.md; contract: docs/kernels.md.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastprompt import reference
from fastprompt._validation import check_prograd_losses_args
from fastprompt.kernels.logit_gradient_layout import logit_gradient_buffer, with_padded_rows
from fastprompt.ops._library import (backend_for, define_op, pads_logit_gradients, refuse_float64,
                                     triton_kernel)
from fastprompt.ops.clip_cross_entropy import (clip_cross_entropy_backward, fused_exponents,
                                               fused_targets)

_EMPTY = (0,)


def _losses_fake(image_features, text_features, zeroshot_text_features, labels, scale,
                 soft_labels, sample_index, smoothing, double_softmax, temperature, compute_grad,
                 q=0.0, q_rows=None):
    n, c = image_features.shape[0], text_features.shape[0]
    task_rows = image_features.new_empty((n,), dtype=torch.float32)
    kl_rows = image_features.new_empty((n,), dtype=torch.float32)
    if not compute_grad:
        return (task_rows, kl_rows, image_features.new_empty(_EMPTY),
                image_features.new_empty(_EMPTY))
    padded = pads_logit_gradients(image_features.device)
    return (task_rows, kl_rows, logit_gradient_buffer(image_features, n, c, padded),
            logit_gradient_buffer(image_features, n, c, padded))


prograd_losses_forward = define_op(
    "prograd_losses_forward(Tensor image_features, Tensor text_features, "
    "Tensor zeroshot_text_features, Tensor labels, Tensor scale, Tensor? soft_labels, "
    "Tensor? sample_index, float smoothing, bool double_softmax, float temperature, "
    "bool compute_grad, float q=0.0, Tensor? q_rows=None) -> (Tensor, Tensor, Tensor, Tensor)",
    _losses_fake, triton_kernel("loss_entry_points", "prograd_losses_forward"))


class ProGradLossesFunction(torch.autograd.Function):
    """Autograd of ``fastprompt::prograd_losses_forward`` (an ``autograd.Function`` for the same
    reason as ``ClipCrossEntropyFunction``)."""

    @staticmethod
    def forward(ctx, image_features, text_features, zeroshot_text_features, labels, scale,
                soft_labels, sample_index, smoothing, double_softmax, temperature, compute_grad,
                q, q_rows):
        outputs = prograd_losses_forward(
            image_features, text_features, zeroshot_text_features, labels, scale, soft_labels,
            sample_index, smoothing, double_softmax, temperature, compute_grad, q, q_rows)
        _, _, grad_task_logits, grad_kl_logits = outputs
        ctx.save_for_backward(image_features, text_features, scale, grad_task_logits, grad_kl_logits)
        ctx.mark_non_differentiable(grad_task_logits, grad_kl_logits)
        # Unused outputs get None, not an N x C zero fill: the two logit-gradient outputs always,
        # and one of the losses in each of ProGrad's two backward passes.
        ctx.set_materialize_grads(False)
        return outputs

    @staticmethod
    def backward(ctx, grad_task_rows, grad_kl_rows, _unused_task, _unused_kl):
        if grad_task_rows is None and grad_kl_rows is None:
            return (None,) * 13
        image_features, text_features, scale, grad_task_logits, grad_kl_logits = ctx.saved_tensors
        if grad_task_logits.dim() != 2:
            raise RuntimeError("prograd_losses: backward called, but the forward ran without "
                               "gradients (inputs did not require grad when it ran)")
        need_x, need_t, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[4]
        if grad_kl_rows is None:  # only the task loss is differentiated: its buffer as it is
            upstream, grad_logits = grad_task_rows.float().contiguous(), grad_task_logits
        elif grad_task_rows is None:
            upstream, grad_logits = grad_kl_rows.float().contiguous(), grad_kl_logits
        else:
            # One N x C buffer for both losses, so the products run once. Not in place: the saved
            # gradients serve again when the graph is retained (the official two-backward
            # procedure). It keeps the saved buffers' zero row padding, which the products read
            # vectorised.
            grad_logits = torch.addcmul(grad_task_logits * grad_task_rows.float()[:, None],
                                        grad_kl_logits, grad_kl_rows.float()[:, None])
            grad_logits = grad_logits.to(grad_task_logits.dtype)
            if grad_task_logits.stride(0) > grad_task_logits.shape[1]:
                grad_logits = with_padded_rows(grad_logits)
            upstream = torch.ones_like(grad_task_rows, dtype=torch.float32)
        gx, gt, gs = clip_cross_entropy_backward(
            upstream, grad_logits, image_features, text_features, scale, True, need_x, need_t,
            need_s)
        return (gx if need_x else None, gt if need_t else None, None, None, gs if need_s else None,
                None, None, None, None, None, None, None, None)


def prograd_losses(image_features: Tensor, text_features: Tensor, zeroshot_text_features: Tensor,
                   labels: Tensor, scale, *, temperature: float = 1.0, double_softmax: bool = False,
                   smoothing: float = 0.0, soft_labels: Optional[Tensor] = None,
                   sample_index: Optional[Tensor] = None, loss: str = "ce",
                   q=0.5) -> tuple[Tensor, Tensor]:
    """ProGrad's task loss and distillation loss towards zero-shot CLIP, fused.

    Args:
        image_features: N x D (cached image features; may require grad).
        text_features: C x D (the prompts' text features; may require grad).
        zeroshot_text_features: C x D, zero-shot CLIP's text features for the same classes
            (hand-written prompts such as "a photo of a {}."). A fixed teacher: no gradient flows
            through the zero-shot logits, to any input.
        labels: N int64 class indices in [0, C).
        scale: the logit multiplier (``logit_scale.exp()``), a float or a 0-d tensor; it scales
            both the prompt logits ``z`` and the zero-shot logits ``z⁰``.
        temperature: τ > 0 of the distillation loss.
        double_softmax, smoothing, soft_labels, sample_index, loss, q: the task loss's options,
            exactly as in ``clip_cross_entropy`` (GCE/MAE included; a ``soft_labels`` table or
            ``q`` requiring grad is refused).

    Returns ``(task_loss, kl_loss)``, both float32 scalar means over the batch, with
    ``kl_loss = mean_i -τ² Σ_c softmax(z⁰_i/τ)_c log softmax(z_i/τ)_c``. Feed them to
    ``prograd_backward``. Runs the Triton kernel on CUDA and the C++ kernel on CPU
    (``FASTPROMPT_BACKEND`` forces one); float64 inputs are for ``fastprompt.reference``.
    """
    backend = backend_for(image_features.device) if isinstance(image_features, torch.Tensor) else None
    s, temperature, choice = check_prograd_losses_args(
        image_features, text_features, zeroshot_text_features, labels, scale,
        temperature=temperature, smoothing=smoothing, soft_labels=soft_labels,
        sample_index=sample_index, loss=loss, q=q, kernel_checks_values=backend == "cpp")
    smoothing = float(smoothing)
    if backend == "reference":
        return reference.prograd_losses_unchecked(
            image_features, text_features, zeroshot_text_features, labels, s, temperature,
            double_softmax, smoothing, soft_labels, sample_index, choice.q, choice.q_rows)
    refuse_float64(backend, image_features.dtype)
    soft_labels, sample_index = fused_targets(smoothing, soft_labels, sample_index)
    q, q_rows = fused_exponents(choice)
    compute_grad = torch.is_grad_enabled() and (
        image_features.requires_grad or text_features.requires_grad or s.requires_grad)
    task_rows, kl_rows, _, _ = ProGradLossesFunction.apply(
        image_features.contiguous(), text_features.contiguous(),
        zeroshot_text_features.detach().contiguous(), labels.contiguous(), s, soft_labels,
        sample_index, smoothing, bool(double_softmax), temperature, compute_grad, q, q_rows)
    return task_rows.mean(), kl_rows.mean()
