"""Every fastprompt op in plain torch: the specification the fused kernels are tested
against (run it in float64), and the fallback when no compiled backend is available.

The formulas (docs/math.md): logits ``z = s * x̂ t̂ᵀ`` (or given, for the ``logits_*`` ops);
targets ``e_y`` or ``(1-ε) e_y + ε r`` with ``r`` uniform, a class-wise row ``CSL[y]`` or an
instance-wise row ``ISL[k]``; cross-entropy over ``softmax(z)``, or over ``softmax(softmax(z))``
for DSPT; or instead of cross-entropy the generalized cross-entropy GCE with exponent ``q``
(``q = 1``: MAE), per row if asked.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastprompt._validation import (check_clip_cross_entropy_args,
                                    check_logits_cross_entropy_args,
                                    check_logits_prograd_losses_args, check_prograd_backward_args,
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


def task_row_losses(z, labels, double_softmax, smoothing, soft_labels=None, sample_index=None,
                    q=0.0, q_rows=None):
    """Per-row task losses of logits ``z`` (N x C): with ``π = softmax(z)`` (DSPT:
    ``softmax(softmax(z))``) and targets ``t``, cross-entropy ``-Σ_c t_c log π_c`` when ``q`` is 0,
    else GCE ``Σ_c t_c (1 - π_c^q) / q`` (``q = 1``: MAE, ``1 - π_y`` for a hard label). ``q_rows``
    (N): one exponent per row instead of ``q``, 0 giving that row cross-entropy (GCE's limit at
    q -> 0). GCE is evaluated as ``-expm1(q log π) / q``, the same value as ``(1 - π^q) / q``
    without the cancellation of ``1 - π^q`` for π^q near 1."""
    if double_softmax:
        z = torch.softmax(z, dim=1)
    logp = torch.log_softmax(z, dim=1)
    t = None
    if smoothing == 0:
        logp_t = logp.gather(1, labels[:, None]).squeeze(1)
        ce = -logp_t
    else:
        t = soft_targets(labels, z.shape[1], smoothing, soft_labels, sample_index, z.dtype)
        ce = -(t * logp).sum(dim=1)
    if q_rows is None and q == 0:
        return ce
    if q_rows is None:
        exponent = torch.tensor(float(q), dtype=z.dtype, device=z.device)
    else:
        exponent = q_rows.to(z.dtype)
    # q = 0 rows take cross-entropy; their GCE branch is computed at q = 1 instead of 0/0, so
    # that no NaN reaches the gradient through torch.where.
    safe = torch.where(exponent > 0, exponent, torch.ones_like(exponent))
    if t is None:
        gce = -torch.expm1(safe * logp_t) / safe
    else:
        gce = -(t * torch.expm1(safe[..., None] * logp)).sum(dim=1) / safe
    return torch.where(exponent > 0, gce, ce)


def _reduced(rows, reduction):
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def clip_cross_entropy(image_features, text_features, labels, scale, *, double_softmax=False,
                       smoothing=0.0, soft_labels=None, sample_index=None, normalize=True,
                       reduction="mean", loss="ce", q=0.5):
    """Cross-entropy of CLIP logits against hard or soft targets; DSPT's double softmax optional;
    ``loss="gce"`` (exponent ``q``, a float or one per row) or ``"mae"`` instead of
    cross-entropy.

    Returns a float32 loss (float64 for float64 inputs): a scalar for ``mean``/``sum``, N values
    for ``none``.
    """
    s, choice = check_clip_cross_entropy_args(
        image_features, text_features, labels, scale, smoothing=smoothing, soft_labels=soft_labels,
        sample_index=sample_index, normalize=normalize, reduction=reduction, loss=loss, q=q)
    return clip_cross_entropy_unchecked(image_features, text_features, labels, s, double_softmax,
                                        float(smoothing), soft_labels, sample_index, normalize,
                                        reduction, choice.q, choice.q_rows)


def clip_cross_entropy_unchecked(image_features, text_features, labels, scale, double_softmax,
                                 smoothing, soft_labels, sample_index, normalize, reduction,
                                 q=0.0, q_rows=None):
    """``clip_cross_entropy`` on arguments already validated (``scale`` a 0-d tensor; ``q`` and
    ``q_rows`` as ``task_row_losses`` takes them)."""
    z = clip_logits(image_features, text_features, scale, normalize)
    return _reduced(task_row_losses(z, labels, double_softmax, smoothing, soft_labels,
                                    sample_index, q, q_rows), reduction)


def logits_cross_entropy(logits, labels, *, double_softmax=False, smoothing=0.0, soft_labels=None,
                         sample_index=None, reduction="mean", loss="ce", q=0.5):
    """``clip_cross_entropy``'s losses on logits the caller computed (N x C), every option the
    same. Returns a float32 loss (float64 for float64 logits)."""
    choice = check_logits_cross_entropy_args(
        logits, labels, smoothing=smoothing, soft_labels=soft_labels, sample_index=sample_index,
        reduction=reduction, loss=loss, q=q)
    return logits_cross_entropy_unchecked(logits, labels, double_softmax, float(smoothing),
                                          soft_labels, sample_index, reduction, choice.q,
                                          choice.q_rows)


def logits_cross_entropy_unchecked(logits, labels, double_softmax, smoothing, soft_labels,
                                   sample_index, reduction, q=0.0, q_rows=None):
    """``logits_cross_entropy`` on arguments already validated."""
    z = logits.to(_compute_dtype(logits))
    return _reduced(task_row_losses(z, labels, double_softmax, smoothing, soft_labels,
                                    sample_index, q, q_rows), reduction)


# ---------------------------------------------------------------------------------------------
# ProGrad (Zhu et al., "Prompt-aligned Gradient for Prompt Tuning"), as the official code does it.

def distillation_rows(z, z0, temperature):
    """``-τ² Σ_c softmax(z⁰/τ)_c log softmax(z/τ)_c`` per row; ``z0`` is a fixed teacher (the
    caller detaches it)."""
    teacher = torch.softmax(z0 / temperature, dim=1)
    log_student = torch.log_softmax(z / temperature, dim=1)
    return -(temperature * temperature) * (teacher * log_student).sum(dim=1)


def prograd_losses(image_features, text_features, zeroshot_text_features, labels, scale, *,
                   temperature=1.0, double_softmax=False, smoothing=0.0, soft_labels=None,
                   sample_index=None, loss="ce", q=0.5):
    """ProGrad's two losses, ``(task_loss, kl_loss)``, both means over the batch.

    ``task_loss`` is ``clip_cross_entropy`` with the same target and loss options;
    ``kl_loss = -τ² Σ_c softmax(z⁰/τ)_c log softmax(z/τ)_c`` with the zero-shot logits
    ``z⁰ = s x̂ t̂₀ᵀ`` a fixed teacher (no gradient flows through them).
    """
    s, temperature, choice = check_prograd_losses_args(
        image_features, text_features, zeroshot_text_features, labels, scale,
        temperature=temperature, smoothing=smoothing, soft_labels=soft_labels,
        sample_index=sample_index, loss=loss, q=q)
    return prograd_losses_unchecked(image_features, text_features, zeroshot_text_features, labels,
                                    s, temperature, double_softmax, float(smoothing), soft_labels,
                                    sample_index, choice.q, choice.q_rows)


def prograd_losses_unchecked(image_features, text_features, zeroshot_text_features, labels, scale,
                             temperature, double_softmax, smoothing, soft_labels, sample_index,
                             q=0.0, q_rows=None):
    """``prograd_losses`` on arguments already validated (``scale`` a 0-d tensor)."""
    task_loss = clip_cross_entropy_unchecked(image_features, text_features, labels, scale,
                                             double_softmax, smoothing, soft_labels, sample_index,
                                             True, "mean", q, q_rows)
    z = clip_logits(image_features, text_features, scale)
    # The official code computes the zero-shot logits under no_grad: a constant teacher.
    z0 = clip_logits(image_features.detach(), zeroshot_text_features.detach(), scale.detach())
    return task_loss, distillation_rows(z, z0, temperature).mean()


def logits_prograd_losses(logits, zeroshot_logits, labels, *, temperature=1.0,
                          double_softmax=False, smoothing=0.0, soft_labels=None, sample_index=None,
                          loss="ce", q=0.5):
    """``prograd_losses`` on logits the caller computed: ``(task_loss, kl_loss)``, both means,
    ``zeroshot_logits`` the fixed teacher ``z⁰`` (no gradient flows into it)."""
    temperature, choice = check_logits_prograd_losses_args(
        logits, zeroshot_logits, labels, temperature=temperature, smoothing=smoothing,
        soft_labels=soft_labels, sample_index=sample_index, loss=loss, q=q)
    return logits_prograd_losses_unchecked(logits, zeroshot_logits, labels, temperature,
                                           double_softmax, float(smoothing), soft_labels,
                                           sample_index, choice.q, choice.q_rows)


def logits_prograd_losses_unchecked(logits, zeroshot_logits, labels, temperature, double_softmax,
                                    smoothing, soft_labels, sample_index, q=0.0, q_rows=None):
    """``logits_prograd_losses`` on arguments already validated."""
    z = logits.to(_compute_dtype(logits))
    task_loss = task_row_losses(z, labels, double_softmax, smoothing, soft_labels, sample_index,
                                q, q_rows).mean()
    z0 = zeroshot_logits.detach().to(z.dtype)
    return task_loss, distillation_rows(z, z0, temperature).mean()


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
