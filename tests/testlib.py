"""Shared test utilities: backend/device parametrisation, the ops' random inputs, float64
comparison, and the loss ops' results with gradients next to their float64 truth and error
allowances."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt import _backend, reference

# The package root loads the ops on first use; tests also call torch.ops.fastprompt.* directly.
(fastprompt.clip_cross_entropy, fastprompt.prograd_losses,  # noqa: B018
 fastprompt.project_conflicting_)


def backend_params():
    """(backend, device) pairs that can run here, as pytest params."""
    params = [pytest.param(("reference", "cpu"), id="reference-cpu")]
    params.append(pytest.param(("cpp", "cpu"), id="cpp-cpu", marks=pytest.mark.skipif(
        not _backend.cpp_available(), reason="C++ extension not built")))
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    params.append(pytest.param(("triton", "cpu"), id="triton-interpreter", marks=pytest.mark.skipif(
        not (_backend.triton_available() and interp), reason="triton interpreter not enabled")))
    if torch.cuda.is_available() and not interp:
        params.append(pytest.param(("triton", "cuda"), id="triton-cuda"))
    return params


@pytest.fixture(params=backend_params())
def backend(request, monkeypatch):
    """Force a backend for the test; yields (backend name, device). Afterwards the ops' CPU key
    gets its C++ kernels back (forced Triton puts the interpreter there while it is set)."""
    from fastprompt.ops._library import backend_for

    name, device = request.param
    monkeypatch.setenv("FASTPROMPT_BACKEND", name)
    yield name, torch.device(device)
    monkeypatch.delenv("FASTPROMPT_BACKEND")
    backend_for(torch.device("cpu"))


TARGETS = ("hard", "uniform", "classwise", "instancewise")


def make_inputs(n, c, d, *, seed, target="hard", device="cpu", dtype=torch.float32, scale=None,
                smoothing=0.2):
    """Random loss inputs ``(x, t, labels, s, kw)``: N x D image and C x D text features, labels,
    a 0-d scale (random in [5, 25] unless given), and the target options of ``target`` as
    keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    t = torch.randn(c, d, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    s = torch.tensor(float(scale) if scale is not None else 5.0 + 20.0 * torch.rand((), generator=g).item())
    kw = {}
    if target != "hard":
        kw["smoothing"] = smoothing
    if target == "classwise":
        kw["soft_labels"] = torch.softmax(3 * torch.randn(c, c, generator=g), dim=1)
    if target == "instancewise":
        m = n + 3
        kw["soft_labels"] = torch.softmax(3 * torch.randn(m, c, generator=g), dim=1)
        kw["sample_index"] = torch.randint(0, m, (n,), generator=g)
    kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
    return x.to(device, dtype), t.to(device, dtype), labels.to(device), s.to(device), kw


def make_prograd_inputs(n, c, d, *, seed, **options):
    """``make_inputs`` plus zero-shot text features near the prompts' (as a tuned prompt stays
    near its template): ``(x, t, t0, labels, s, kw)``."""
    x, t, labels, s, kw = make_inputs(n, c, d, seed=seed, **options)
    g = torch.Generator().manual_seed(seed + 1)
    t0 = (t.float().cpu() + 0.7 * torch.randn(t.shape, generator=g)).to(t.device, t.dtype)
    return x, t, t0, labels, s, kw


def assert_close_to_truth(actual, truth, rtol, atol, name, *, baseline=None, extra_atol=0.0):
    """Compare a result to its float64 truth; atol scales with the truth's magnitude.

    ``baseline``: the same quantity from the eager reference in the same precision as ``actual``
    (float32 for float32 inputs). Its largest error against the truth is added to the allowance,
    so the rule reads "no worse than eager torch in this precision, plus the tolerance" (as
    Cut-Cross-Entropy's tests have it). That is what a float32 kernel can be held to: where the
    result is a small difference of large intermediates (the double softmax's suppressed
    gradients, N = 1 projections, logits of ±100) float32 itself misses 1e-5 relative, in the
    reference as in any kernel. ``extra_atol``: an absolute allowance justified by the caller
    (a rounding bound).
    """
    assert actual is not None, f"{name}: no value"
    actual = actual.detach().double().cpu()
    truth = truth.detach().double().cpu()
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} vs {tuple(truth.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = truth.abs().max().item() if truth.numel() else 0.0
    allowed = atol * max(scale, 1e-3) + rtol * truth.abs() + extra_atol
    baseline_error = 0.0
    if baseline is not None:
        baseline = baseline.detach().double().cpu()
        assert baseline.shape == truth.shape, f"{name}: baseline shape {tuple(baseline.shape)}"
        baseline_error = (baseline - truth).abs().max().item() if truth.numel() else 0.0
        allowed = allowed + baseline_error
    error = (actual - truth).abs()
    bad = error > allowed
    if bad.any():
        i = int((error - allowed).flatten().argmax())
        raise AssertionError(
            f"{name}: {int(bad.sum())} / {error.numel()} elements off; worst at flat index {i}: "
            f"got {actual.flatten()[i].item():.9g}, truth {truth.flatten()[i].item():.9g}, error "
            f"{error.flatten()[i].item():.3g} > allowed {allowed.flatten()[i].item():.3g} "
            f"(rtol {rtol}, atol {atol} x {max(scale, 1e-3):.3g}, baseline error "
            f"{baseline_error:.3g}, extra up to {float(torch.as_tensor(extra_atol).max()):.3g})")


def float32_logit_error(magnitudes, k: float = 8.0) -> torch.Tensor:
    """Allowance on each element of a float32 logit gradient ``G`` that is a small difference of
    larger terms (DSPT: ``G = p (q - t - Σpq + Σtp)``): a float32 evaluation errs by a few ulps of
    those terms, not of ``G``. ``magnitudes``: float64 N x C, the sum of the terms' absolute
    values, weighted like ``G``. Over thousands of random cases the eager reference and the fused
    kernels stay below k = 2.5 for the scale gradient, which is the most sensitive."""
    return k * torch.finfo(torch.float32).eps * magnitudes.detach().double().abs()


def half_storage_error(grad_terms, dtype) -> torch.Tensor:
    """Allowance on each element of the logit gradient for storing it in the half-precision
    ``dtype``, as the fused kernels do: each rounding moves an element by at most half an ulp
    (``eps/2`` relative, or half the subnormal spacing near 0). ``grad_terms``: the float64 N x C
    gradients stored one by one (one term, or ProGrad's weighted task and distillation
    gradients, which are rounded each and once more after being combined)."""
    info = torch.finfo(dtype)
    mag = sum(g.detach().double().abs() for g in grad_terms)
    combined = len(grad_terms) > 1
    roundings = len(grad_terms) + (1 if combined else 0)
    subnormal = info.smallest_normal * info.eps  # the spacing of the subnormals
    return (2 if combined else 1) * info.eps / 2 * mag + roundings * subnormal / 2


def propagate_logit_error(error, image_features, text_features, scale, normalize=True):
    """Carry an elementwise bound ``E`` (N x C) on the error of ``G = ∂L/∂z`` through the
    closed-form gradients (docs/math.md): ``|δ(G T̂)| <= E |T̂|``, ``|δ(Gᵀ X̂)| <= Eᵀ |X̂|``, then
    the normalisation's projection ``v - (v·f̂) f̂`` (bounded elementwise by ``|δv| + (|δv|·|f̂|)
    |f̂|``), and ``|δ ∂L/∂s| <= Σ E |z| / s``. Returns allowances for the image, text and scale
    gradients (float64, CPU)."""
    e = error.detach().double().cpu()
    x = image_features.detach().double().cpu()
    t = text_features.detach().double().cpu()
    s = abs(float(scale))
    if normalize:
        x_norm, t_norm = x.norm(dim=1, keepdim=True), t.norm(dim=1, keepdim=True)
    else:
        x_norm, t_norm = torch.ones_like(x[:, :1]), torch.ones_like(t[:, :1])
    xh, th = x / x_norm, t / t_norm
    z = s * xh @ th.T

    def projected(dv, fh, f_norm):
        if not normalize:
            return s * dv
        return s * (dv + (dv * fh.abs()).sum(1, keepdim=True) * fh.abs()) / f_norm

    image = projected(e @ th.abs(), xh, x_norm)
    text = projected(e.T @ xh.abs(), th, t_norm)
    return image, text, float((e * z.abs()).sum() / s)


def targets64(labels, c, kw):
    """The N x C target distribution in float64, built here from the definitions."""
    onehot = F.one_hot(labels, c).double()
    eps = kw.get("smoothing", 0.0)
    if eps == 0:
        return onehot
    table = kw.get("soft_labels")
    if table is None:
        r = torch.full_like(onehot, 1.0 / c)
    elif "sample_index" in kw:
        r = table.double()[kw["sample_index"]]
    else:
        r = table.double()[labels]
    return (1 - eps) * onehot + eps * r


def stop_training_at(learner_class, epoch: int, patch=setattr) -> None:
    """From now on, training ``learner_class`` (a ``fastprompt.train.Learner`` subclass) raises KeyboardInterrupt
    when it starts ``epoch`` (the epochs before are finished and checkpointed), as Ctrl-C would.
    ``patch(learner_class, "train_epoch", replacement)``: pytest's ``monkeypatch.setattr`` to
    undo it later."""
    real_epoch = learner_class.train_epoch

    def interrupted(self, *, epoch: int, bar):
        if epoch == stop_at:
            raise KeyboardInterrupt
        return real_epoch(self, epoch=epoch, bar=bar)

    stop_at = epoch
    patch(learner_class, "train_epoch", interrupted)


# --- the loss ops' results with gradients, their float64 truth and the error allowances -------

def clip_loss_and_grads(fn, x, t, labels, s, kw, *, reduction="mean", grad_image=True,
                        grad_scale=True, upstream=None, **opts):
    """``(loss, grad image, grad text, grad scale)`` of ``fn`` (``clip_cross_entropy`` or the
    reference's), the loss reduced by ``reduction`` (``"none"``: weighted by ``upstream``)."""
    x = x.detach().clone().requires_grad_(grad_image)
    t = t.detach().clone().requires_grad_(True)
    s = s.detach().clone().requires_grad_(grad_scale)
    loss = fn(x, t, labels, s, reduction=reduction, **kw, **opts)
    objective = loss if loss.dim() == 0 else (loss * upstream.to(loss)).sum()
    objective.backward()
    return loss, x.grad, t.grad, s.grad


def clip_truth(x, t, labels, s, kw, **opts):
    """``clip_loss_and_grads`` of the reference in float64."""
    kw64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in kw.items()}
    return clip_loss_and_grads(reference.clip_cross_entropy, x.double(), t.double(), labels,
                               s.double(), kw64, **opts)


def clip_eager(x, t, labels, s, kw, **opts):
    """The eager reference in the inputs' own precision: the baseline of the error rule."""
    return clip_loss_and_grads(reference.clip_cross_entropy, x, t, labels, s, kw, **opts)


def row_weights(n, reduction="mean", upstream=None):
    """∂(reduced loss)/∂(row loss): 1/N, 1, or the upstream gradient of ``reduction="none"``."""
    if reduction == "mean":
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    if reduction == "sum":
        return torch.ones(n, dtype=torch.float64)
    return upstream.double().cpu()


def exponent_column(q, n):
    """GCE's exponent as an N x 1 float64 column: a number, or one per row (``loss="gce"`` with
    a tensor ``q``); 0 is cross-entropy."""
    if torch.is_tensor(q):
        return q.detach().double().cpu()[:, None]
    return torch.full((n, 1), float(q), dtype=torch.float64)


def loss_exponent(opts):
    """The exponent that ``loss``/``q`` options (as the ops take them) give: 0 for cross-entropy,
    1 for MAE, else ``q`` (a number or a tensor)."""
    loss = opts.get("loss", "ce")
    return 0.0 if loss == "ce" else 1.0 if loss == "mae" else opts.get("q", 0.5)


def row_logit_terms64(z, target, double_softmax, q=0.0):
    """The closed forms of docs/math.md in float64, per row of logits ``z``: ``G = ∂ℓ_i/∂z`` and
    ``M``, the magnitudes of the terms that cancel in it. With ``π = softmax(z)`` (DSPT:
    ``softmax(p)``, ``p = softmax(z)``), ``a_c = t_c π_c^q`` and ``A = Σ a``, the loss's gradient
    with respect to the softmax's input is ``g = π A - a`` (cross-entropy: ``q = 0``, ``π - t``);
    DSPT carries it through the first softmax, ``G = p (g - Σ_k p_k g_k)``."""
    p = torch.softmax(z, dim=1)
    pi = torch.softmax(p, dim=1) if double_softmax else p
    a = target * pi ** exponent_column(q, z.shape[0])
    big_a = a.sum(1, keepdim=True)
    g, g_mag = pi * big_a - a, pi * big_a + a
    if not double_softmax:
        return g, g_mag
    return (p * (g - (p * g).sum(1, keepdim=True)),
            p * (g_mag + (p * g_mag).sum(1, keepdim=True)))


def row_losses64(z, target, double_softmax, q=0.0):
    """Per-row losses from their definitions in float64: cross-entropy ``-Σ t log π`` where the
    exponent is 0, else GCE ``Σ_c t_c (1 - π_c^q) / q`` as written (no expm1)."""
    pi = torch.softmax(torch.softmax(z, dim=1) if double_softmax else z, dim=1)
    qc = exponent_column(q, z.shape[0])
    ce = -(target * torch.log(pi)).sum(1)
    gce = (target * (1 - pi ** qc)).sum(1) / torch.where(qc > 0, qc, 1.0)[:, 0]
    return torch.where(qc[:, 0] > 0, gce, ce)


def target_table64(labels, c, kw):
    """``reference.soft_targets`` of the target options ``kw`` in float64 on the CPU."""
    kw = {k: v.cpu() if torch.is_tensor(v) else v for k, v in kw.items()}
    table = kw.get("soft_labels")
    return reference.soft_targets(labels.cpu(), c, kw.get("smoothing", 0.0),
                                  None if table is None else table.double(),
                                  kw.get("sample_index"), torch.float64)


def logit_terms64(x, t, labels, s, kw, double_softmax, weights, normalize=True, q=0.0):
    """Float64 logits ``z``, the logit gradient ``G`` (closed forms of docs/math.md, rows weighted
    by ``weights``; ``q``: GCE's exponent, 0 for cross-entropy) and ``M``, the magnitudes of the
    terms that cancel in ``G``."""
    z = reference.clip_logits(x.double().cpu(), t.double().cpu(), s.double().cpu(), normalize)
    grad, mag = row_logit_terms64(z, target_table64(labels, z.shape[1], kw), double_softmax, q)
    w = weights[:, None]
    return z, grad * w, mag * w.abs()


def clip_allowances(x, t, labels, s, kw, double_softmax, weights, normalize=True,
                    dtype=torch.float32, q=0.0):
    """Extra absolute allowances for (loss, grad image, grad text, grad scale): float32
    cancellation in ``G`` plus, in half precision, the rounding of ``G`` stored in that dtype,
    carried through the closed-form gradients (``q``: GCE's exponent, 0 for cross-entropy)."""
    z, grad, mag = logit_terms64(x, t, labels, s, kw, double_softmax, weights, normalize, q)
    error = float32_logit_error(mag)
    if dtype in (torch.float16, torch.bfloat16):
        error = error + half_storage_error([grad], dtype)
    return (0.0, *propagate_logit_error(error, x, t, s, normalize))


def prograd_allowances(x, t, t0, labels, s, kw, double_softmax, temperature=1.0,
                       weights=(1.0, 1.0), q=0.0):
    """Extra absolute allowances for (task, kl, grad image, grad text, grad scale) of the mean
    ProGrad losses in float32: the cancellation in the combined logit gradient
    ``w_task G_task + w_kl G_kl``, whose terms are those of ``G_task`` (as in ``clip_allowances``)
    and ``τ (softmax(z/τ) + softmax(z0/τ)) / N`` for the distillation term, carried through the
    closed-form gradients like ``clip_allowances``."""
    n = x.shape[0]
    _, _, task_mag = logit_terms64(x, t, labels, s, kw, double_softmax, row_weights(n), q=q)
    z = reference.clip_logits(x.double().cpu(), t.double().cpu(), s.double().cpu(), True)
    z0 = reference.clip_logits(x.double().cpu(), t0.double().cpu(), s.double().cpu(), True)
    kl_mag = temperature * (torch.softmax(z / temperature, dim=1)
                            + torch.softmax(z0 / temperature, dim=1)) / n
    mag = abs(weights[0]) * task_mag + abs(weights[1]) * kl_mag
    return (0.0, 0.0, *propagate_logit_error(float32_logit_error(mag), x, t, s))


def float64_target_options(kw):
    """Float64 copies of the target options ``kw``; soft-label rows renormalised so they sum to 1
    in float64 too."""
    kw = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
          for k, v in kw.items()}
    if "soft_labels" in kw:
        kw["soft_labels"] = kw["soft_labels"] / kw["soft_labels"].sum(dim=1, keepdim=True)
    return kw


def prograd_formula_rows(z, z0, labels, kw, double_softmax, tau, q=0.0):
    """Per-row task and distillation losses from the formulas of docs/math.md, in float64 (``q``:
    the task loss's GCE exponent, 0 for cross-entropy)."""
    target = targets64(labels, z.shape[1], kw)
    if torch.is_tensor(q) or q != 0:
        task = row_losses64(z, target, double_softmax, q)
    else:
        student = torch.softmax(z, dim=1) if double_softmax else z
        task = torch.logsumexp(student, dim=1) - (target * student).sum(dim=1)
    # -τ² Σ p0 log q = τ² (KL(p0 ‖ q) + H(p0)), written through torch's kl_div
    p0 = torch.softmax(z0 / tau, dim=1)
    kl = tau**2 * (F.kl_div(torch.log_softmax(z / tau, dim=1), p0, reduction="none").sum(1)
                   - (p0 * torch.log(p0)).sum(1))
    return task, kl


def prograd_losses_and_grads(fn, x, t, t0, labels, s, kw, *, weights=(1.0, 1.0), grad_image=True,
                             grad_scale=True, **opts):
    """``(task loss, kl loss, grad image, grad text, grad scale)`` of ``fn`` (``prograd_losses``
    or the reference's), the gradients those of ``weights[0] task + weights[1] kl``."""
    x = x.detach().clone().requires_grad_(grad_image)
    t = t.detach().clone().requires_grad_(True)
    s = s.detach().clone().requires_grad_(grad_scale)
    task, kl = fn(x, t, t0, labels, s, **kw, **opts)
    (weights[0] * task + weights[1] * kl).backward()
    return task, kl, x.grad, t.grad, s.grad


def prograd_truth(x, t, t0, labels, s, kw, **opts):
    """``prograd_losses_and_grads`` of the reference in float64."""
    return prograd_losses_and_grads(reference.prograd_losses, x.double(), t.double(), t0.double(),
                                    labels, s.double(), float64_target_options(kw), **opts)


def prograd_eager(x, t, t0, labels, s, kw, **opts):
    """The eager reference in the inputs' own precision: the baseline of the error rule."""
    return prograd_losses_and_grads(reference.prograd_losses, x, t, t0, labels, s, kw, **opts)


# What each of prograd_losses_and_grads's results is, for messages.
PROGRAD_NAMES = ("task loss", "kl loss", "grad image", "grad text", "grad scale")


def prograd_half_allowances(x, t, t0, labels, s, kw, dtype, double_softmax=True):
    """Extra allowances for (task, kl, grad image, grad text, grad scale) of the mean losses in
    half precision: the fused kernels store both logit gradients in the input dtype and round
    their weighted sum once more, so the scale's gradient, a sum that cancels, gets that
    rounding bound on top."""
    z = (s.double() * F.normalize(x.double(), dim=1) @ F.normalize(t.double(), dim=1).T).cpu()
    z0 = (s.double() * F.normalize(x.double(), dim=1) @ F.normalize(t0.double(), dim=1).T).cpu()
    z.requires_grad_()
    kw_cpu = {k: v.cpu() if torch.is_tensor(v) else v for k, v in kw.items()}
    task_rows, kl_rows = prograd_formula_rows(z, z0, labels.cpu(), float64_target_options(kw_cpu),
                                              double_softmax, 1.0)
    n = x.shape[0]
    terms = [torch.autograd.grad(task_rows.sum(), z)[0] / n,
             torch.autograd.grad(kl_rows.sum(), z)[0] / n]
    _, _, scale_allowance = propagate_logit_error(half_storage_error(terms, dtype), x, t, s)
    return 0.0, 0.0, 0.0, 0.0, scale_allowance


# --- the logits ops: inputs, results with gradients, float64 truth and allowances ------------

def make_logits_inputs(n, c, *, seed, target="hard", device="cpu", dtype=torch.float32,
                       spread=4.0, smoothing=0.2):
    """Random logits ``z`` (N x C, standard deviation ``spread``), labels and the target options
    of ``target`` as keyword arguments: ``(z, labels, kw)``."""
    _, _, labels, _, kw = make_inputs(n, c, 1, seed=seed, target=target, device=device,
                                      smoothing=smoothing)
    g = torch.Generator().manual_seed(seed + 7)
    z = spread * torch.randn(n, c, generator=g)
    return z.to(device, dtype), labels, kw


def logits_loss_and_grads(fn, z, labels, kw, *, reduction="mean", upstream=None, **opts):
    """``(loss, grad logits)`` of ``fn`` (``logits_cross_entropy`` or the reference's), the loss
    reduced by ``reduction`` (``"none"``: weighted by ``upstream``)."""
    z = z.detach().clone().requires_grad_(True)
    loss = fn(z, labels, reduction=reduction, **kw, **opts)
    objective = loss if loss.dim() == 0 else (loss * upstream.to(loss)).sum()
    objective.backward()
    return loss, z.grad


def _float64_options(kw):
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in kw.items()}


def logits_truth(z, labels, kw, **opts):
    """``logits_loss_and_grads`` of the reference in float64."""
    return logits_loss_and_grads(reference.logits_cross_entropy, z.double(), labels,
                                 _float64_options(kw), **opts)


def logits_eager(z, labels, kw, **opts):
    """The eager reference in the logits' own precision: the baseline of the error rule."""
    return logits_loss_and_grads(reference.logits_cross_entropy, z, labels, kw, **opts)


def logits_allowances(z, labels, kw, double_softmax, weights, q=0.0, dtype=torch.float32):
    """Extra absolute allowances for (loss, grad logits): float32 cancellation in ``G`` weighted
    by ``weights``, plus in half precision its two roundings to ``dtype`` (``G`` stored by the
    forward, ``w_i G`` by the backward)."""
    grad, mag = row_logit_terms64(z.double().cpu(), target_table64(labels, z.shape[1], kw),
                                  double_softmax, q)
    w = weights[:, None]
    error = float32_logit_error(mag * w.abs())
    if dtype in (torch.float16, torch.bfloat16):
        error = error + 2 * half_storage_error([grad * w], dtype)
    return 0.0, error


def logits_prograd_and_grads(fn, z, z0, labels, kw, *, weights=(1.0, 1.0), **opts):
    """``(task loss, kl loss, grad logits)`` of ``fn`` (``logits_prograd_losses`` or the
    reference's), the gradient that of ``weights[0] task + weights[1] kl``."""
    z = z.detach().clone().requires_grad_(True)
    task, kl = fn(z, z0, labels, **kw, **opts)
    (weights[0] * task + weights[1] * kl).backward()
    return task, kl, z.grad


def logits_prograd_truth(z, z0, labels, kw, **opts):
    """``logits_prograd_and_grads`` of the reference in float64."""
    return logits_prograd_and_grads(reference.logits_prograd_losses, z.double(), z0.double(),
                                    labels, _float64_options(kw), **opts)


def logits_prograd_allowances(z, z0, labels, kw, double_softmax, temperature=1.0,
                              weights=(1.0, 1.0), q=0.0, dtype=torch.float32):
    """Extra absolute allowances for (task, kl, grad logits) of the mean losses: the float32
    cancellation in ``w_task G_task + w_kl G_kl`` (the distillation term's terms
    ``τ (softmax(z/τ) + softmax(z0/τ))``), plus in half precision the roundings of both stored
    gradients and of their weighted sum."""
    n = z.shape[0]
    z64, z064 = z.double().cpu(), z0.double().cpu()
    task, task_mag = row_logit_terms64(z64, target_table64(labels, z.shape[1], kw),
                                       double_softmax, q)
    p_tau = torch.softmax(z64 / temperature, dim=1)
    p0_tau = torch.softmax(z064 / temperature, dim=1)
    kl, kl_mag = temperature * (p_tau - p0_tau), temperature * (p_tau + p0_tau)
    error = float32_logit_error((abs(weights[0]) * task_mag + abs(weights[1]) * kl_mag) / n)
    if dtype in (torch.float16, torch.bfloat16):
        error = error + half_storage_error([weights[0] * task / n, weights[1] * kl / n], dtype)
    return 0.0, 0.0, error


# The task losses the ops take: ``loss_options(kind, n)`` gives their keyword arguments.
LOSS_KINDS = ("ce", "gce", "mae", "gce-rows")


def loss_options(kind, n, *, device="cpu", seed=0, q=0.5):
    """``loss``/``q`` keyword arguments of a loss kind: cross-entropy, GCE with ``q``, MAE, or
    GCE with one exponent per row ("gce-rows": rows of cross-entropy, MAE, q = 1e-3 and random
    exponents in (0, 1), as NLPrompt's per-row choice generalised)."""
    if kind == "gce-rows":
        rows = torch.rand(n, generator=torch.Generator().manual_seed(seed + 11))
        rows[0::4], rows[1::4], rows[2::4] = 0.0, 1.0, 1e-3
        return dict(loss="gce", q=rows.to(device))
    if kind == "gce":
        return dict(loss="gce", q=q)
    return dict(loss=kind)
