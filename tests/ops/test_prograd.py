"""ProGrad: the fused losses and the multi-tensor projection on every backend against float64
evaluations of the formulas, prograd_backward against the official two-backward procedure on a
small text transformer, bad input, gradcheck and torch.compile."""
from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import Transformer

import fastprompt
from fastprompt import reference
from testlib import (assert_close_to_truth, backend, fresh_seed,  # noqa: F401 (fixture)
                     half_storage_error, propagate_logit_error)

TARGETS = ("hard", "uniform", "classwise", "instancewise")


def _has_kernels(name: str) -> bool:
    if name == "cpp":
        return hasattr(torch.ops.fastprompt_cpp, "prograd_losses_forward")
    if name == "triton":
        return importlib.util.find_spec("fastprompt.kernels.prograd") is not None
    return True


@pytest.fixture
def prograd_backend(backend):
    """``backend``, skipped where that backend has no ProGrad kernels yet."""
    name, _ = backend
    if not _has_kernels(name):
        pytest.skip(f"no ProGrad kernels in the {name} backend")
    return backend


def make_inputs(n, c, d, *, target="hard", seed=None, device="cpu", dtype=torch.float32,
                scale=None, smoothing=0.2):
    g = torch.Generator().manual_seed(fresh_seed() if seed is None else seed)
    x = torch.randn(n, d, generator=g)
    t = torch.randn(c, d, generator=g)
    # Zero-shot features near the prompts' (as a tuned prompt stays near its template).
    t0 = t + 0.7 * torch.randn(c, d, generator=g)
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
    return (x.to(device, dtype), t.to(device, dtype), t0.to(device, dtype), labels.to(device),
            s.to(device), kw)


def _double(kw):
    """Float64 copies; soft-label rows renormalised so they sum to 1 in float64 too."""
    kw = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
    if "soft_labels" in kw:
        kw["soft_labels"] = kw["soft_labels"] / kw["soft_labels"].sum(dim=1, keepdim=True)
    return kw


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


def formula_rows(z, z0, labels, kw, double_softmax, tau):
    """Per-row task and distillation losses from the formulas of DESIGN.md, in float64."""
    target = targets64(labels, z.shape[1], kw)
    student = torch.softmax(z, dim=1) if double_softmax else z
    task = torch.logsumexp(student, dim=1) - (target * student).sum(dim=1)
    # -τ² Σ p0 log q = τ² (KL(p0 ‖ q) + H(p0)), written through torch's kl_div
    p0 = torch.softmax(z0 / tau, dim=1)
    kl = tau**2 * (F.kl_div(torch.log_softmax(z / tau, dim=1), p0, reduction="none").sum(1)
                   - (p0 * torch.log(p0)).sum(1))
    return task, kl


def losses_and_grads(fn, x, t, t0, labels, s, kw, *, weights=(1.0, 1.0), grad_image=True,
                     grad_scale=True, **opts):
    x = x.detach().clone().requires_grad_(grad_image)
    t = t.detach().clone().requires_grad_(True)
    s = s.detach().clone().requires_grad_(grad_scale)
    task, kl = fn(x, t, t0, labels, s, **kw, **opts)
    (weights[0] * task + weights[1] * kl).backward()
    return task, kl, x.grad, t.grad, s.grad


def truth(x, t, t0, labels, s, kw, **opts):
    return losses_and_grads(reference.prograd_losses, x.double(), t.double(), t0.double(), labels,
                            s.double(), _double(kw), **opts)


def eager(x, t, t0, labels, s, kw, **opts):
    """The eager reference in the inputs' own precision: the baseline of the error rule."""
    return losses_and_grads(reference.prograd_losses, x, t, t0, labels, s, kw, **opts)


NAMES = ("task loss", "kl loss", "grad image", "grad text", "grad scale")


# --- the reference against independent formulas ------------------------------------------------

@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", TARGETS)
def test_reference_losses_match_formulas(target, double_softmax):
    x, t, t0, labels, s, kw = make_inputs(13, 7, 10, target=target, dtype=torch.float64)
    kw, s, tau = _double(kw), s.double(), 1.7
    z = s * F.normalize(x, dim=1) @ F.normalize(t, dim=1).T
    z0 = s * F.normalize(x, dim=1) @ F.normalize(t0, dim=1).T
    task_rows, kl_rows = formula_rows(z, z0, labels, kw, double_softmax, tau)
    task, kl = reference.prograd_losses(x, t, t0, labels, s, temperature=tau,
                                        double_softmax=double_softmax, **kw)
    torch.testing.assert_close(task, task_rows.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl, kl_rows.mean(), rtol=1e-12, atol=1e-12)


def test_reference_kl_gradient_is_tau_times_softmax_difference():
    x, t, t0, labels, s, _ = make_inputs(9, 6, 8, dtype=torch.float64)
    tau = 2.5
    t = t.requires_grad_()
    _, kl = reference.prograd_losses(x, t, t0, labels, s, temperature=tau)
    (grad_t,) = torch.autograd.grad(kl, t)
    # Chain rule by hand: z = s x̂ t̂ᵀ, ∂kl/∂z = τ (softmax(z/τ) - softmax(z0/τ)) / N.
    xh, tn = F.normalize(x, dim=1), t.detach().norm(dim=1, keepdim=True)
    th, t0h = t.detach() / tn, F.normalize(t0, dim=1)
    z, z0 = s * xh @ th.T, s * xh @ t0h.T
    g = tau * (torch.softmax(z / tau, 1) - torch.softmax(z0 / tau, 1)) / x.shape[0]
    a = s * g.T @ xh
    expected = (a - (a * th).sum(1, keepdim=True) * th) / tn
    torch.testing.assert_close(grad_t, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", ["hard", "instancewise"])
def test_reference_gradcheck(target, double_softmax):
    x, t, t0, labels, s, kw = make_inputs(5, 4, 3, target=target)
    kw = _double(kw)
    t0 = t0.double()
    x, t, s = (v.double().requires_grad_() for v in (x, t, s))

    def losses(x, t, s):
        return reference.prograd_losses(x, t, t0, labels, s, temperature=0.8,
                                        double_softmax=double_softmax, **kw)

    # The teacher z⁰ = s x̂ t̂₀ᵀ is held fixed (detached), so finite differences in x or s, which
    # move it, only agree for the task loss; both losses are checked in t.
    assert torch.autograd.gradcheck(lambda x, t, s: losses(x, t, s)[0], (x, t, s))
    assert torch.autograd.gradcheck(lambda t: losses(x.detach(), t, s.detach()), (t,))


def test_reference_teacher_gets_no_gradient():
    x, t, t0, labels, s, _ = make_inputs(6, 5, 4, dtype=torch.float64)
    t0 = t0.requires_grad_()
    _, kl = reference.prograd_losses(x, t.requires_grad_(), t0, labels, s)
    kl.backward()
    assert t0.grad is None and t.grad is not None


# --- every backend against float64 ------------------------------------------------------------

@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", TARGETS)
def test_backend_logit_gradients_match_formulas(prograd_backend, target, double_softmax):
    name, device = prograd_backend
    if name == "reference":
        pytest.skip("the reference has no fused forward op (it is checked through autograd)")
    n, c, d = (11, 9, 17) if name == "triton" else (29, 41, 33)
    x, t, t0, labels, s, kw = make_inputs(n, c, d, target=target, device=device)
    tau = 1.3
    soft = kw.get("soft_labels")
    outputs = torch.ops.fastprompt.prograd_losses_forward(
        x, t, t0, labels, s, None if soft is None else soft.float(), kw.get("sample_index"),
        float(kw.get("smoothing", 0.0)), double_softmax, tau, True, name)
    task_rows, kl_rows, grad_task, grad_kl = outputs
    z = (s.double() * F.normalize(x.double(), dim=1) @ F.normalize(t.double(), dim=1).T).requires_grad_()
    z0 = s.double() * F.normalize(x.double(), dim=1) @ F.normalize(t0.double(), dim=1).T
    want_task, want_kl = formula_rows(z, z0, labels.cpu(), _double(kw), double_softmax, tau)
    (want_grad_task,) = torch.autograd.grad(want_task.sum(), z)
    (want_grad_kl,) = torch.autograd.grad(want_kl.sum(), z)
    assert task_rows.dtype == kl_rows.dtype == torch.float32
    assert grad_task.dtype == grad_kl.dtype == x.dtype
    for what, a, b in zip(("task rows", "kl rows", "grad task logits", "grad kl logits"),
                          (task_rows, kl_rows, grad_task, grad_kl),
                          (want_task, want_kl, want_grad_task, want_grad_kl)):
        assert_close_to_truth(a, b, 1e-5, 1e-5, what)


@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", TARGETS)
def test_backend_matches_float64(prograd_backend, target, double_softmax):
    name, device = prograd_backend
    n, c, d = (13, 11, 19) if name == "triton" else (37, 53, 70)
    x, t, t0, labels, s, kw = make_inputs(n, c, d, target=target, device=device)
    # Distinct weights, so the backward's combination of the two logit gradients is checked.
    opts = dict(double_softmax=double_softmax, temperature=1.6, weights=(0.7, -1.9))
    got = losses_and_grads(fastprompt.prograd_losses, x, t, t0, labels, s, kw, **opts)
    want = truth(x, t, t0, labels, s, kw, **opts)
    base = eager(x, t, t0, labels, s, kw, **opts)
    for what, a, b, e in zip(NAMES, got, want, base):
        assert_close_to_truth(a, b, 1e-5, 1e-5, what, baseline=e)


@pytest.mark.parametrize("which", [0, 1])
def test_backend_one_loss_differentiated(prograd_backend, which):
    # Only one of the two losses reaches the backward (as in each of ProGrad's two passes): the
    # other's per-row gradient arrives as None, not as materialised zeros.
    name, device = prograd_backend
    n, c, d = (13, 11, 19) if name == "triton" else (37, 53, 70)
    x, t, t0, labels, s, kw = make_inputs(n, c, d, target="uniform", device=device)
    weights = (1.0, 0.0) if which == 0 else (0.0, 1.0)
    want = truth(x, t, t0, labels, s, kw, double_softmax=True, weights=weights)
    x_req = x.clone().requires_grad_()
    t_req = t.clone().requires_grad_()
    s_req = s.clone().requires_grad_()
    losses = fastprompt.prograd_losses(x_req, t_req, t0, labels, s_req, double_softmax=True, **kw)
    losses[which].backward()
    base = eager(x, t, t0, labels, s, kw, double_softmax=True, weights=weights)
    for what, a, b, e in zip(NAMES[2:], (x_req.grad, t_req.grad, s_req.grad), want[2:], base[2:]):
        assert_close_to_truth(a, b, 1e-5, 1e-5, what, baseline=e)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 3), (5, 1, 16), (2, 3, 129), (33, 17, 5)])
def test_backend_odd_sizes(prograd_backend, shape):
    name, device = prograd_backend
    x, t, t0, labels, s, kw = make_inputs(*shape, target="uniform", device=device)
    got = losses_and_grads(fastprompt.prograd_losses, x, t, t0, labels, s, kw, double_softmax=True)
    want = truth(x, t, t0, labels, s, kw, double_softmax=True)
    for what, a, b in zip(NAMES, got, want):
        # Tiny shapes give results near 0 by cancellation (C = 1: both losses are exactly 0;
        # N = 1: small image and scale gradients), where float32 keeps an absolute error of
        # ~eps · s from O(s) intermediates: an absolute floor instead of one relative to the truth.
        assert torch.isfinite(a).all(), what
        torch.testing.assert_close(a.detach().double().cpu(), b.detach().double().cpu(),
                                   rtol=1e-5, atol=1e-5, msg=lambda m, what=what: f"{what}: {m}")


def test_backend_extreme_logits(prograd_backend):
    # scale 100, images on (or opposite to) their class and teacher rows: no overflow, no NaN.
    name, device = prograd_backend
    x, t, t0, labels, s, kw = make_inputs(12, 8, 16, device=device, scale=100.0)
    x = t0[labels].clone()
    x[::2] = -x[::2]
    opts = dict(temperature=0.5, weights=(1.0, 0.5))
    got = losses_and_grads(fastprompt.prograd_losses, x, t, t0, labels, s, kw, **opts)
    want = truth(x, t, t0, labels, s, kw, **opts)
    base = eager(x, t, t0, labels, s, kw, **opts)
    for what, a, b, e in zip(NAMES, got, want, base):
        assert_close_to_truth(a, b, 1e-4, 1e-5, what, baseline=e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backend_half_precision(prograd_backend, dtype):
    name, device = prograd_backend
    x, t, t0, labels, s, kw = make_inputs(16, 10, 24, target="classwise", device=device, dtype=dtype)
    got = losses_and_grads(fastprompt.prograd_losses, x, t, t0, labels, s, kw, double_softmax=True)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert got[2].dtype == got[3].dtype == dtype
    want = truth(x, t, t0, labels, s, kw, double_softmax=True)
    base = eager(x, t, t0, labels, s, kw, double_softmax=True)
    # The fused kernels store both logit gradients in the input dtype and round their weighted
    # sum once more: the scale's gradient, a sum that cancels, gets that rounding bound on top.
    z = (s.double() * F.normalize(x.double(), dim=1) @ F.normalize(t.double(), dim=1).T).cpu()
    z0 = (s.double() * F.normalize(x.double(), dim=1) @ F.normalize(t0.double(), dim=1).T).cpu()
    z.requires_grad_()
    task_rows, kl_rows = formula_rows(z, z0, labels.cpu(), _double({k: v.cpu() if torch.is_tensor(v)
                                                                    else v for k, v in kw.items()}),
                                      True, 1.0)
    n = x.shape[0]
    terms = [torch.autograd.grad(task_rows.sum(), z)[0] / n, torch.autograd.grad(kl_rows.sum(), z)[0] / n]
    _, _, scale_allowance = propagate_logit_error(half_storage_error(terms, dtype), x, t, s)
    extra = (0.0, 0.0, 0.0, 0.0, scale_allowance)
    for what, a, b, e, x_atol in zip(NAMES, got, want, base, extra):
        assert_close_to_truth(a, b, 2e-2, 2e-2, what, baseline=e, extra_atol=x_atol)


def test_backend_frozen_image_features_and_no_grad(prograd_backend):
    name, device = prograd_backend
    x, t, t0, labels, s, kw = make_inputs(11, 7, 9, target="instancewise", device=device)
    t_req = t.clone().requires_grad_()
    t0_req = t0.clone().requires_grad_()
    task, kl = fastprompt.prograd_losses(x, t_req, t0_req, labels, s, **kw)
    (task + kl).backward()
    assert x.grad is None and t0_req.grad is None
    with torch.no_grad():
        again = fastprompt.prograd_losses(x, t, t0, labels, s, **kw)
    want = truth(x, t, t0, labels, s, kw, grad_image=False, grad_scale=False)
    assert_close_to_truth(again[0], want[0], 1e-5, 1e-5, "no-grad task loss")
    assert_close_to_truth(again[1], want[1], 1e-5, 1e-5, "no-grad kl loss")
    assert_close_to_truth(t_req.grad, want[3], 1e-5, 1e-5, "grad text")


# --- the projection -----------------------------------------------------------------------------

def projection_truth(g, h, lam):
    """Float64 evaluation of ProGrad's update for one pair, with the sign test in Python."""
    g64, h64 = g.double().cpu(), h.double().cpu()
    dot = float((g64 * h64).sum())
    if dot < 0:
        return g64 - lam * dot / float((h64 * h64).sum()) * h64
    return g64


def projection_pairs(device, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(16, 32), (5,), (3, 7, 11), (1,), (1000,), (2, 3)]
    dtypes = [torch.float32, torch.float32, torch.float64, torch.float32, torch.float32, torch.bfloat16]
    grads, refs = [], []
    for i, (shape, dtype) in enumerate(zip(shapes, dtypes)):
        g = torch.randn(shape, generator=gen)
        h = torch.randn(shape, generator=gen)
        if i % 2 == 0:  # make the pair conflict, and the others agree
            h = h - (2 * (g * h).sum() / (g * g).sum() + 0.5) * g
        else:
            h = h + (2 * abs((g * h).sum()) / (g * g).sum() + 0.5) * g
        grads.append(g.to(device, dtype))
        refs.append(h.to(device, dtype))
    refs[3] = torch.zeros_like(refs[3])  # a zero reference: g unchanged, no NaN
    return grads, refs


@pytest.mark.parametrize("lam", [1.0, 0.5, 0.0])
def test_backend_projection_matches_float64(prograd_backend, lam):
    name, device = prograd_backend
    grads, refs = projection_pairs(device, fresh_seed())
    conflicting = [float((g.double() * h.double()).sum()) < 0 for g, h in zip(grads, refs)]
    assert any(conflicting) and not all(conflicting)
    want = [projection_truth(g, h, lam) for g, h in zip(grads, refs)]
    refs_before = [h.clone() for h in refs]
    fastprompt.project_conflicting_(grads, refs, lam=lam)
    for i, (g, w, dtype) in enumerate(zip(grads, want, [g.dtype for g in grads])):
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        assert_close_to_truth(g, w, tol, tol, f"grads[{i}]")
    for h, before in zip(refs, refs_before):
        assert torch.equal(h, before)
    # After a full projection (λ = 1) nothing conflicts any more: <g, h> ≈ 0 where it did.
    if lam == 1.0:
        for g, h, was in zip(grads, refs, conflicting):
            if was and h.dtype != torch.bfloat16:
                cos = float((g.double() * h.double()).sum() / (g.double().norm() * h.double().norm()))
                assert abs(cos) < 1e-5


def test_backend_projection_non_contiguous_and_empty(prograd_backend):
    name, device = prograd_backend
    g = torch.randn(8, 6, device=device).T  # strided view
    h = -g.contiguous() + 0.1 * torch.randn(6, 8, device=device)
    want = projection_truth(g, h, 1.0)
    fastprompt.project_conflicting_([g, torch.empty(0, device=device)], [h, torch.empty(0, device=device)])
    assert_close_to_truth(g, want, 1e-5, 1e-5, "strided grads")
    fastprompt.project_conflicting_([], [])


# --- prograd_backward against the official two-backward procedure -----------------------------------

class TinyTextEncoder(torch.nn.Module):
    """A CoOp-style text tower: learned context tokens spliced into fixed embeddings, open_clip's
    causal Transformer, pooling at the end-of-text position, a projection."""

    def __init__(self, classes=5, length=9, width=32, n_ctx=3, dim=16, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.transformer = Transformer(width, layers=2, heads=4)
        self.ln_final = torch.nn.LayerNorm(width)
        self.text_projection = torch.nn.Parameter(torch.randn(width, dim, generator=gen) / width**0.5)
        self.ctx = torch.nn.Parameter(0.3 * torch.randn(n_ctx, width, generator=gen))
        self.register_buffer("embeddings", torch.randn(classes, length, width, generator=gen))
        self.register_buffer("eot", torch.randint(n_ctx + 2, length, (classes,), generator=gen))
        self.register_buffer("attn_mask", torch.full((length, length), float("-inf")).triu_(1))
        self.n_ctx = n_ctx

    def forward(self):
        e = self.embeddings
        x = torch.cat([e[:, :1], self.ctx.expand(e.shape[0], -1, -1), e[:, 1 + self.n_ctx:]], dim=1)
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        return x[torch.arange(x.shape[0]), self.eot] @ self.text_projection


def _prograd_step(losses_fn, backward_fn, encoder, x, t0, labels, s, kw, lam, task_fn=None,
                  kl_sign=1.0):
    encoder.zero_grad(set_to_none=False)
    params = [encoder.ctx, encoder.text_projection, encoder.ln_final.weight]
    for p in params:  # a gradient from an earlier step, to be accumulated into
        p.grad = torch.full_like(p, 0.01)
    text = encoder()
    task, kl = losses_fn(x, text, t0, labels, s, temperature=1.5, double_softmax=True, **kw)
    if task_fn is not None:
        task = task_fn(x, text, labels, s, double_softmax=True, **kw)
    backward_fn(task, kl_sign * kl, params, lam=lam)
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("batched", [None, True, False], ids=["per-device", "batched", "two-pass"])
@pytest.mark.parametrize("lam", [1.0, 0.6])
def test_prograd_backward_equals_two_backward_passes(prograd_backend, lam, batched):
    name, device = prograd_backend
    seed = fresh_seed()
    encoder = TinyTextEncoder(seed=seed).to(device)
    x, _, _, labels, s, kw = make_inputs(6, 5, 16, target="classwise", seed=seed, device=device)
    t0 = torch.randn(5, 16, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    # With the distillation loss and with its negative, every parameter's pair conflicts in
    # exactly one of the two runs: both branches of the projection are exercised.
    ours_backward = functools.partial(fastprompt.prograd_backward, batched=batched)
    for kl_sign in (1.0, -1.0):
        ours = _prograd_step(fastprompt.prograd_losses, ours_backward, encoder, x, t0,
                             labels, s, kw, lam, kl_sign=kl_sign)
        official = _prograd_step(reference.prograd_losses, reference.prograd_backward, encoder, x,
                                 t0, labels, s, kw, lam, kl_sign=kl_sign)
        for i, (a, b) in enumerate(zip(ours, official)):
            assert_close_to_truth(a, b, 1e-4, 1e-5, f"params[{i}].grad (kl sign {kl_sign})")


def test_prograd_backward_with_clip_cross_entropy_task(prograd_backend):
    # The task loss from clip_cross_entropy: its backward op runs under the batched backward too.
    name, device = prograd_backend
    seed = fresh_seed()
    encoder = TinyTextEncoder(seed=seed).to(device)
    x, _, _, labels, s, kw = make_inputs(7, 5, 16, target="uniform", seed=seed, device=device)
    t0 = torch.randn(5, 16, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    ours = _prograd_step(fastprompt.prograd_losses, fastprompt.prograd_backward, encoder, x, t0,
                         labels, s, kw, 1.0, task_fn=fastprompt.clip_cross_entropy)
    official = _prograd_step(reference.prograd_losses, reference.prograd_backward, encoder, x, t0,
                             labels, s, kw, 1.0, task_fn=reference.clip_cross_entropy)
    for i, (a, b) in enumerate(zip(ours, official)):
        assert_close_to_truth(a, b, 1e-4, 1e-5, f"params[{i}].grad")


def test_reference_prograd_backward_projects_hand_computed_case():
    # One parameter w, losses linear in it: g = ∇task = a, h = ∇kl = b with <a, b> < 0.
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    b = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    ours = [functools.partial(fastprompt.prograd_backward, batched=b) for b in (True, False)]
    for backward_fn in (reference.prograd_backward, *ours):
        w.grad = None
        backward_fn((w * a).sum(), (w * b).sum(), [w])
        # a - <a,b>/|b|² b = a + b/2
        torch.testing.assert_close(w.grad, torch.tensor([0.5, 2.0, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "two-pass"])
def test_prograd_backward_partly_reached_params(batched):
    # u is reached by the task loss only, through an expanded (stride-0) gradient; v by the
    # distillation loss only; r by neither (its .grad stays as it was). As the official code:
    # the missing gradient counts as zeros, so u gets g and v gets nothing added.
    u = torch.zeros(4, requires_grad=True)
    v = torch.zeros(3, requires_grad=True)
    r = torch.zeros(2, requires_grad=True)
    r.grad = torch.full((2,), 7.0)
    v.grad = torch.ones(3)
    task, kl = 2 * u.sum(), (v * torch.arange(3.0)).sum()
    fastprompt.prograd_backward(task, kl, [u, v, r], batched=batched)
    torch.testing.assert_close(u.grad, torch.full((4,), 2.0))
    torch.testing.assert_close(v.grad, torch.ones(3))
    torch.testing.assert_close(r.grad, torch.full((2,), 7.0))


# --- bad input ----------------------------------------------------------------------------------------

def _bad_loss_cases():
    x, t, t0, labels, s, _ = make_inputs(4, 3, 5)
    nan_t0 = t0.clone()
    nan_t0[1, 1] = float("nan")
    zero_t0 = t0.clone()
    zero_t0[2] = 0
    return [
        ("zeroshot_text_features", TypeError, (x, t, t0.tolist(), labels, s), {}),
        ("zeroshot_text_features", ValueError, (x, t, t0[:2], labels, s), {}),
        ("zeroshot_text_features", ValueError, (x, t, t0[:, :4], labels, s), {}),
        ("zeroshot_text_features", TypeError, (x, t, t0.double(), labels, s), {}),
        ("zeroshot_text_features", ValueError, (x, t, nan_t0, labels, s), {}),
        ("zeroshot_text_features", ValueError, (x, t, zero_t0, labels, s), {}),
        ("temperature", ValueError, (x, t, t0, labels, s), {"temperature": 0.0}),
        ("temperature", ValueError, (x, t, t0, labels, s), {"temperature": -1.0}),
        ("temperature", ValueError, (x, t, t0, labels, s), {"temperature": float("nan")}),
        ("temperature", TypeError, (x, t, t0, labels, s), {"temperature": "1"}),
        ("labels", ValueError, (x, t, t0, torch.tensor([0, 1, 3, 0]), s), {}),
        ("smoothing", ValueError, (x, t, t0, labels, s), {"smoothing": 1.5}),
        ("text_features", ValueError, (x, t[:, :4], t0, labels, s), {}),
    ]


@pytest.mark.parametrize("case", range(len(_bad_loss_cases())))
def test_bad_loss_input_names_the_argument(backend, case):
    arg, exc, args, kw = _bad_loss_cases()[case]
    with pytest.raises(exc, match=f"^{arg}"):
        fastprompt.prograd_losses(*args, **kw)
    with pytest.raises(exc, match=f"^{arg}"):
        reference.prograd_losses(*args, **kw)


def _bad_projection_cases():
    g = [torch.randn(3, 4), torch.randn(5)]
    h = [torch.randn(3, 4), torch.randn(5)]
    nan = [h[0], torch.tensor([0.0, float("inf"), 0, 0, 0])]
    return [
        ("ref_grads", ValueError, (g, h[:1]), {}),
        ("ref_grads", ValueError, (g, [h[0], torch.randn(6)]), {}),
        ("ref_grads", ValueError, (g, [h[0], h[1].double()]), {}),
        ("ref_grads", ValueError, (g, nan), {}),
        ("grads", ValueError, ([g[0], torch.full((5,), float("nan"))], h), {}),
        ("grads", TypeError, (g[0], h[0]), {}),
        ("grads", TypeError, ([g[0], torch.arange(5)], h), {}),
        ("lam", ValueError, (g, h), {"lam": -0.5}),
        ("lam", ValueError, (g, h), {"lam": float("inf")}),
        ("lam", TypeError, (g, h), {"lam": None}),
    ]


@pytest.mark.parametrize("case", range(len(_bad_projection_cases())))
def test_bad_projection_input_names_the_argument(backend, case):
    arg, exc, args, kw = _bad_projection_cases()[case]
    before = [x.clone() for x in args[0]] if isinstance(args[0], list) else None
    with pytest.raises(exc, match=f"^{arg}"):
        fastprompt.project_conflicting_(*args, **kw)
    with pytest.raises(exc, match=f"^{arg}"):
        reference.project_conflicting_(*args, **kw)
    if before is not None:  # refused before anything was written
        for a, b in zip(args[0], before):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_bad_projection_input_keeps_list_indices(backend):
    # Empty tensors are skipped by the kernels; a message still names the caller's index, and
    # nothing is written (the C++ kernel checks from its reduction sums, before its update pass).
    g = [torch.empty(0), torch.randn(5), torch.randn(3, 2), torch.randn(4)]
    h = [torch.empty(0), -g[1], torch.randn(3, 2), torch.randn(4)]
    before = [x.clone() for x in g]
    bad_h = list(h)
    bad_h[3] = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    with pytest.raises(ValueError, match=r"^ref_grads\[3\]: contains NaN"):
        fastprompt.project_conflicting_(g, bad_h)
    bad_g = list(g)
    bad_g[2] = torch.full((3, 2), float("inf"))
    with pytest.raises(ValueError, match=r"^grads\[2\]: contains NaN"):
        fastprompt.project_conflicting_(bad_g, h)
    for a, b in zip(g, before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_prograd_backward_input_names_the_argument(backend):
    w = torch.randn(4, requires_grad=True)
    frozen = torch.randn(4)
    cases = [
        ("lam", ValueError, lambda: ((w * 2).sum(), (w * 3).sum(), [w]), {"lam": -1.0}),
        ("params", ValueError, lambda: ((w * 2).sum(), (w * 3).sum(), []), {}),
        ("params", ValueError, lambda: ((w * 2).sum(), (w * 3).sum(), [w, frozen]), {}),
        ("task_loss", ValueError, lambda: (w * 2, (w * 3).sum(), [w]), {}),
        ("kl_loss", ValueError, lambda: ((w * 2).sum(), (frozen * 3).sum(), [w]), {}),
        # One batched backward sends a zero through the other loss's branch too, and 0 * inf is
        # NaN: either loss may be named for a non-finite gradient.
        ("(task_loss|kl_loss)", ValueError, lambda: ((w * float("nan")).sum(), (w * 3).sum(), [w]), {}),
        ("(task_loss|kl_loss)", ValueError, lambda: ((w * 2).sum(), (w * float("inf")).sum(), [w]), {}),
    ]
    for arg, exc, make, kw in cases:
        for fn in (fastprompt.prograd_backward, reference.prograd_backward):
            w.grad = None
            with pytest.raises(exc, match=f"^{arg}"):
                fn(*make(), **kw)


# --- integration -----------------------------------------------------------------------------------

def test_torch_compile_fullgraph(prograd_backend):
    name, device = prograd_backend
    if name == "triton" and device.type == "cpu":
        pytest.skip("inductor does not run the Triton interpreter on CPU tensors")
    x, t, t0, labels, s, kw = make_inputs(8, 6, 16, target="classwise", device=device)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    def step(x, t, t0, labels, s, table):
        task, kl = fastprompt.prograd_losses(x, t, t0, labels, s, double_softmax=True,
                                             smoothing=0.2, soft_labels=table, temperature=2.0)
        return task + 0.5 * kl

    t_req = t.clone().requires_grad_()
    loss = step(x, t_req, t0, labels, s, kw["soft_labels"])
    loss.backward()
    want = truth(x, t, t0, labels, s, kw, double_softmax=True, temperature=2.0, weights=(1.0, 0.5))
    assert_close_to_truth(loss, want[0] + 0.5 * want[1], 1e-5, 1e-5, "compiled loss")
    assert_close_to_truth(t_req.grad, want[3], 1e-5, 1e-5, "compiled grad text")


def test_opcheck_cpp_ops():
    if not _has_kernels("cpp"):
        pytest.skip("no ProGrad kernels in the cpp backend")
    x, t, t0, labels, s, kw = make_inputs(6, 5, 8, target="instancewise")
    # Inputs without requires_grad: the op's autograd is ProGradLossesFunction.
    args = (x, t, t0, labels, s, kw["soft_labels"], kw["sample_index"], 0.2, True, 0.7, True, "cpp")
    torch.library.opcheck(torch.ops.fastprompt.prograd_losses_forward.default, args)
    grads, refs = projection_pairs("cpu", 0)
    torch.library.opcheck(torch.ops.fastprompt.project_conflicting_.default,
                          (grads, refs, 1.0, "cpp"), test_utils=("test_schema", "test_faketensor"))


def test_functorch_vmap_of_the_backward(prograd_backend):
    # torch.func.vmap over autograd.grad meets the fused backward ops' vmap rules.
    name, device = prograd_backend
    x, t, t0, labels, s, kw = make_inputs(9, 6, 12, target="uniform", device=device)
    t_req = t.clone().requires_grad_()
    task, kl = fastprompt.prograd_losses(x, t_req, t0, labels, s, double_softmax=True, **kw)
    ce = fastprompt.clip_cross_entropy(x, t_req, labels, s, **kw)
    losses = torch.stack([task, kl, ce])
    (rows,) = torch.func.vmap(
        lambda v: torch.autograd.grad(losses, [t_req], v, retain_graph=True))(torch.eye(3, device=device))
    for i, loss in enumerate((task, kl, ce)):
        (want,) = torch.autograd.grad(loss, [t_req], retain_graph=True)
        torch.testing.assert_close(rows[i], want, rtol=1e-6, atol=1e-7)
