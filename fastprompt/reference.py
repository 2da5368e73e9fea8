"""Every fastprompt op in plain torch: the specification the fused kernels are tested
against (run it in float64), and the fallback when no compiled backend is available.

The formulas (docs/math.md): logits ``z = s * x̂ t̂ᵀ``; targets ``e_y`` or
``(1-ε) e_y + ε r`` with ``r`` uniform, a class-wise row ``CSL[y]`` or an instance-wise row
``ISL[k]``; cross-entropy over ``softmax(z)``, or over ``softmax(softmax(z))`` for DSPT.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastprompt._validation import (check_clip_cross_entropy_args, check_prograd_backward_args,
                                    check_prograd_losses_args, check_project_conflicting_args,
                                    finiteness_checks, run_value_checks)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Half-precision inputs accumulate in float32, as the kernels do.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def clip_logits(image_features, text_features, scale, normalize=True):
    """``s * x̂ t̂ᵀ`` in float32 (float64 for float64 inputs)."""
    dt = _compute_dtype(image_features)
    x = image_features.to(dt)
    t = text_features.to(dt)
    if normalize:
        x, t = unit_rows(x), unit_rows(t)
    return scale.to(dt) * (x @ t.T)


def unit_rows(x):
    """``x_i / ‖x_i‖``, each row divided by its largest magnitude first so that the norm of any
    finite nonzero row neither overflows nor underflows (the divisor is held constant for
    autograd: the result does not depend on it)."""
    x = x / x.detach().abs().amax(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True)


def soft_targets(labels, num_classes, smoothing, soft_labels=None, sample_index=None, dtype=torch.float32):
    """The N x C target distribution: one-hot, or ``(1-ε) e_y + ε r``."""
    onehot = F.one_hot(labels, num_classes).to(dtype)
    if smoothing == 0:
        return onehot
    if soft_labels is None:
        r = torch.full_like(onehot, 1.0 / num_classes)
    elif sample_index is None:
        r = soft_labels.to(dtype)[labels]
    else:
        r = soft_labels.to(dtype)[sample_index]
    return (1.0 - smoothing) * onehot + smoothing * r


def clip_cross_entropy(image_features, text_features, labels, scale, *, double_softmax=False,
                       smoothing=0.0, soft_labels=None, sample_index=None, normalize=True,
                       reduction="mean"):
    """Cross-entropy of CLIP logits against hard or soft targets; DSPT's double softmax optional.

    Returns a float32 loss (float64 for float64 inputs): a scalar for ``mean``/``sum``, N values
    for ``none``.
    """
    s = check_clip_cross_entropy_args(
        image_features, text_features, labels, scale, smoothing=smoothing, soft_labels=soft_labels,
        sample_index=sample_index, normalize=normalize, reduction=reduction)
    return clip_cross_entropy_unchecked(image_features, text_features, labels, s, double_softmax,
                                        float(smoothing), soft_labels, sample_index, normalize, reduction)


def clip_cross_entropy_unchecked(image_features, text_features, labels, scale, double_softmax,
                                 smoothing, soft_labels, sample_index, normalize, reduction):
    """``clip_cross_entropy`` on arguments already validated (``scale`` a 0-d tensor)."""
    s = scale
    z = clip_logits(image_features, text_features, s, normalize)
    if double_softmax:
        z = torch.softmax(z, dim=1)
    logp = torch.log_softmax(z, dim=1)
    if smoothing == 0:
        loss = -logp.gather(1, labels[:, None]).squeeze(1)
    else:
        t = soft_targets(labels, z.shape[1], smoothing, soft_labels, sample_index, z.dtype)
        loss = -(t * logp).sum(dim=1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


# ---------------------------------------------------------------------------------------------
# ProGrad (Zhu et al., "Prompt-aligned Gradient for Prompt Tuning"), as the official code does it.

def prograd_losses(image_features, text_features, zeroshot_text_features, labels, scale, *,
                   temperature=1.0, double_softmax=False, smoothing=0.0, soft_labels=None,
                   sample_index=None):
    """ProGrad's two losses, ``(task_loss, kl_loss)``, both means over the batch.

    ``task_loss`` is ``clip_cross_entropy`` with the same target options;
    ``kl_loss = -τ² Σ_c softmax(z⁰/τ)_c log softmax(z/τ)_c`` with the zero-shot logits
    ``z⁰ = s x̂ t̂₀ᵀ`` a fixed teacher (no gradient flows through them).
    """
    s, temperature = check_prograd_losses_args(
        image_features, text_features, zeroshot_text_features, labels, scale,
        temperature=temperature, smoothing=smoothing, soft_labels=soft_labels,
        sample_index=sample_index)
    return prograd_losses_unchecked(image_features, text_features, zeroshot_text_features, labels,
                                    s, temperature, double_softmax, float(smoothing), soft_labels,
                                    sample_index)


def prograd_losses_unchecked(image_features, text_features, zeroshot_text_features, labels, scale,
                             temperature, double_softmax, smoothing, soft_labels, sample_index):
    """``prograd_losses`` on arguments already validated (``scale`` a 0-d tensor)."""
    task_loss = clip_cross_entropy_unchecked(image_features, text_features, labels, scale,
                                             double_softmax, smoothing, soft_labels, sample_index,
                                             True, "mean")
    z = clip_logits(image_features, text_features, scale)
    # The official code computes the zero-shot logits under no_grad: a constant teacher.
    z0 = clip_logits(image_features.detach(), zeroshot_text_features.detach(), scale.detach())
    teacher = torch.softmax(z0 / temperature, dim=1)
    log_student = torch.log_softmax(z / temperature, dim=1)
    kl_rows = -(temperature * temperature) * (teacher * log_student).sum(dim=1)
    return task_loss, kl_rows.mean()


def project_conflicting_(grads, ref_grads, lam=1.0):
    """Per tensor pair ``(g, h)``: where ``<g, h> < 0``, ``g <- g - lam <g,h>/||h||² h`` in place.

    The per-parameter loop of the official code; the sign test stays on the device.
    """
    lam = check_project_conflicting_args(grads, ref_grads, lam)
    run_value_checks(finiteness_checks("grads", grads) + finiteness_checks("ref_grads", ref_grads))
    project_conflicting_unchecked_(grads, ref_grads, lam)


def project_conflicting_unchecked_(grads, ref_grads, lam):
    """``project_conflicting_`` on arguments already validated."""
    for g, h in zip(grads, ref_grads):
        g32, h32 = g.to(_compute_dtype(g)), h.to(_compute_dtype(h))
        dot = (g32 * h32).sum()
        # torch.where, not `if`: no host synchronisation. When h == 0, dot == 0 and the
        # (NaN) conflicting branch is never selected.
        coef = torch.where(dot < 0, lam * dot / (h32 * h32).sum(), torch.zeros_like(dot))
        g.copy_(g32 - coef * h32)


def prograd_backward(task_loss, kl_loss, params, lam=1.0):
    """The official ProGrad update as two backward passes, accumulated into ``param.grad``.

    ``kl_loss.backward(retain_graph=True)``, copy the gradients ``h``; ``task_loss.backward()``
    gives ``g``; project each ``g`` against its ``h``; then add the result to whatever
    ``param.grad`` held before, as ``backward()`` would.
    """
    params, lam = check_prograd_backward_args(task_loss, kl_loss, params, lam)
    previous = [p.grad for p in params]
    for p in params:
        p.grad = None
    kl_loss.backward(retain_graph=True, inputs=params)
    ref_grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    task_loss.backward(inputs=params)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    run_value_checks(finiteness_checks("task_loss: gradient of params", grads)
                     + finiteness_checks("kl_loss: gradient of params", ref_grads))
    project_conflicting_unchecked_(grads, ref_grads, lam)
    for p, g, before in zip(params, grads, previous):
        p.grad = g if before is None else before.add_(g)
