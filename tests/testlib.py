"""Shared test utilities: backend/device parametrisation, the ops' random inputs, and float64
comparison."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt import _backend

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
