"""prograd_losses: the fused task and distillation losses on every backend against float64
evaluations of the formulas (the task loss cross-entropy, DSPT, GCE or MAE), bad input, gradcheck
of the reference, torch.compile, opcheck and vmap of the backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt import reference
from testlib import (PROGRAD_NAMES, TARGETS, assert_close_to_truth, backend,  # noqa: F401 (fixture)
                     float64_target_options, loss_exponent, loss_options,
                     make_prograd_inputs, prograd_eager,
                     prograd_allowances, prograd_formula_rows, prograd_half_allowances,
                     prograd_losses_and_grads, prograd_truth)


# --- the reference against independent formulas ------------------------------------------------

@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", TARGETS)
def test_reference_losses_match_formulas(target, double_softmax, seed):
    x, t, t0, labels, s, kw = make_prograd_inputs(13, 7, 10, target=target, dtype=torch.float64,
                                                  seed=seed)
    kw, s, tau = float64_target_options(kw), s.double(), 1.7
    z = s * F.normalize(x, dim=1) @ F.normalize(t, dim=1).T
    z0 = s * F.normalize(x, dim=1) @ F.normalize(t0, dim=1).T
    task_rows, kl_rows = prograd_formula_rows(z, z0, labels, kw, double_softmax, tau)
    task, kl = reference.prograd_losses(x, t, t0, labels, s, temperature=tau,
                                        double_softmax=double_softmax, **kw)
    torch.testing.assert_close(task, task_rows.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl, kl_rows.mean(), rtol=1e-12, atol=1e-12)


def test_reference_kl_gradient_is_tau_times_softmax_difference(seed):
    x, t, t0, labels, s, _ = make_prograd_inputs(9, 6, 8, dtype=torch.float64, seed=seed)
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
def test_reference_gradcheck(target, double_softmax, seed):
    x, t, t0, labels, s, kw = make_prograd_inputs(5, 4, 3, target=target, seed=seed)
    kw = float64_target_options(kw)
    t0 = t0.double()
    x, t, s = (v.double().requires_grad_() for v in (x, t, s))

    def losses(x, t, s):
        return reference.prograd_losses(x, t, t0, labels, s, temperature=0.8,
                                        double_softmax=double_softmax, **kw)

    # The teacher z⁰ = s x̂ t̂₀ᵀ is held fixed (detached), so finite differences in x or s, which
    # move it, only agree for the task loss; both losses are checked in t.
    assert torch.autograd.gradcheck(lambda x, t, s: losses(x, t, s)[0], (x, t, s))
    assert torch.autograd.gradcheck(lambda t: losses(x.detach(), t, s.detach()), (t,))


def test_reference_teacher_gets_no_gradient(seed):
    x, t, t0, labels, s, _ = make_prograd_inputs(6, 5, 4, dtype=torch.float64, seed=seed)
    t0 = t0.requires_grad_()
    _, kl = reference.prograd_losses(x, t.requires_grad_(), t0, labels, s)
    kl.backward()
    assert t0.grad is None and t.grad is not None


# --- every backend against float64 ------------------------------------------------------------

@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", TARGETS)
def test_backend_logit_gradients_match_formulas(backend, target, double_softmax, seed):
    name, device = backend
    if name == "reference":
        pytest.skip("the reference has no fused forward op (it is checked through autograd)")
    n, c, d = (11, 9, 17) if name == "triton" else (29, 41, 33)
    x, t, t0, labels, s, kw = make_prograd_inputs(n, c, d, target=target, device=device, seed=seed)
    tau = 1.3
    soft = kw.get("soft_labels")
    outputs = torch.ops.fastprompt.prograd_losses_forward(
        x, t, t0, labels, s, None if soft is None else soft.float(), kw.get("sample_index"),
        float(kw.get("smoothing", 0.0)), double_softmax, tau, True)
    task_rows, kl_rows, grad_task, grad_kl = outputs
    z = (s.double() * F.normalize(x.double(), dim=1) @ F.normalize(t.double(), dim=1).T).requires_grad_()
    z0 = s.double() * F.normalize(x.double(), dim=1) @ F.normalize(t0.double(), dim=1).T
    want_task, want_kl = prograd_formula_rows(z, z0, labels.cpu(), float64_target_options(kw),
                                              double_softmax, tau)
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
def test_backend_matches_float64(backend, target, double_softmax, seed):
    name, device = backend
    n, c, d = (13, 11, 19) if name == "triton" else (37, 53, 70)
    x, t, t0, labels, s, kw = make_prograd_inputs(n, c, d, target=target, device=device, seed=seed)
    # Distinct weights, so the backward's combination of the two logit gradients is checked.
    opts = dict(double_softmax=double_softmax, temperature=1.6, weights=(0.7, -1.9))
    got = prograd_losses_and_grads(fastprompt.prograd_losses, x, t, t0, labels, s, kw, **opts)
    want = prograd_truth(x, t, t0, labels, s, kw, **opts)
    base = prograd_eager(x, t, t0, labels, s, kw, **opts)
    extra = prograd_allowances(x, t, t0, labels, s, kw, double_softmax, 1.6, (0.7, -1.9))
    for what, a, b, e, x_atol in zip(PROGRAD_NAMES, got, want, base, extra):
        assert_close_to_truth(a, b, 1e-5, 1e-5, what, baseline=e, extra_atol=x_atol)


@pytest.mark.parametrize("which", [0, 1])
def test_backend_one_loss_differentiated(backend, which, seed):
    # Only one of the two losses reaches the backward (as in each of ProGrad's two passes): the
    # other's per-row gradient arrives as None, not as materialised zeros.
    name, device = backend
    n, c, d = (13, 11, 19) if name == "triton" else (37, 53, 70)
    x, t, t0, labels, s, kw = make_prograd_inputs(n, c, d, target="uniform", device=device,
                                                  seed=seed)
    weights = (1.0, 0.0) if which == 0 else (0.0, 1.0)
    want = prograd_truth(x, t, t0, labels, s, kw, double_softmax=True, weights=weights)
    x_req = x.clone().requires_grad_()
    t_req = t.clone().requires_grad_()
    s_req = s.clone().requires_grad_()
    losses = fastprompt.prograd_losses(x_req, t_req, t0, labels, s_req, double_softmax=True, **kw)
    losses[which].backward()
    base = prograd_eager(x, t, t0, labels, s, kw, double_softmax=True, weights=weights)
    for what, a, b, e in zip(PROGRAD_NAMES[2:], (x_req.grad, t_req.grad, s_req.grad), want[2:],
                             base[2:]):
        assert_close_to_truth(a, b, 1e-5, 1e-5, what, baseline=e)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 3), (5, 1, 16), (2, 3, 129), (33, 17, 5)])
def test_backend_odd_sizes(backend, shape, seed):
    name, device = backend
    x, t, t0, labels, s, kw = make_prograd_inputs(*shape, target="uniform", device=device,
                                                  seed=seed)
    got = prograd_losses_and_grads(fastprompt.prograd_losses, x, t, t0, labels, s, kw,
                                   double_softmax=True)
    want = prograd_truth(x, t, t0, labels, s, kw, double_softmax=True)
    for what, a, b in zip(PROGRAD_NAMES, got, want):
        # Tiny shapes give results near 0 by cancellation (C = 1: both losses are exactly 0;
        # N = 1: small image and scale gradients), where float32 keeps an absolute error of
        # ~eps · s from O(s) intermediates: an absolute floor instead of one relative to the truth.
        assert torch.isfinite(a).all(), what
        torch.testing.assert_close(a.detach().double().cpu(), b.detach().double().cpu(),
                                   rtol=1e-5, atol=1e-5, msg=lambda m, what=what: f"{what}: {m}")


def test_backend_extreme_logits(backend, seed):
    # scale 100, images on (or opposite to) their class and teacher rows: no overflow, no NaN.
    name, device = backend
    x, t, t0, labels, s, kw = make_prograd_inputs(12, 8, 16, device=device, scale=100.0, seed=seed)
    x = t0[labels].clone()
    x[::2] = -x[::2]
    opts = dict(temperature=0.5, weights=(1.0, 0.5))
    got = prograd_losses_and_grads(fastprompt.prograd_losses, x, t, t0, labels, s, kw, **opts)
    want = prograd_truth(x, t, t0, labels, s, kw, **opts)
    base = prograd_eager(x, t, t0, labels, s, kw, **opts)
    for what, a, b, e in zip(PROGRAD_NAMES, got, want, base):
        assert_close_to_truth(a, b, 1e-4, 1e-5, what, baseline=e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backend_half_precision(backend, dtype, seed):
    name, device = backend
    x, t, t0, labels, s, kw = make_prograd_inputs(16, 10, 24, target="classwise", device=device, dtype=dtype,
                                                  seed=seed)
    got = prograd_losses_and_grads(fastprompt.prograd_losses, x, t, t0, labels, s, kw,
                                   double_softmax=True)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert got[2].dtype == got[3].dtype == dtype
    want = prograd_truth(x, t, t0, labels, s, kw, double_softmax=True)
    base = prograd_eager(x, t, t0, labels, s, kw, double_softmax=True)
    extra = prograd_half_allowances(x, t, t0, labels, s, kw, dtype)
    for what, a, b, e, x_atol in zip(PROGRAD_NAMES, got, want, base, extra):
        assert_close_to_truth(a, b, 2e-2, 2e-2, what, baseline=e, extra_atol=x_atol)


def test_backend_frozen_image_features_and_no_grad(backend, seed):
    name, device = backend
    x, t, t0, labels, s, kw = make_prograd_inputs(11, 7, 9, target="instancewise", device=device,
                                                  seed=seed)
    t_req = t.clone().requires_grad_()
    t0_req = t0.clone().requires_grad_()
    task, kl = fastprompt.prograd_losses(x, t_req, t0_req, labels, s, **kw)
    (task + kl).backward()
    assert x.grad is None and t0_req.grad is None
    with torch.no_grad():
        again = fastprompt.prograd_losses(x, t, t0, labels, s, **kw)
    want = prograd_truth(x, t, t0, labels, s, kw, grad_image=False, grad_scale=False)
    assert_close_to_truth(again[0], want[0], 1e-5, 1e-5, "no-grad task loss")
    assert_close_to_truth(again[1], want[1], 1e-5, 1e-5, "no-grad kl loss")
    assert_close_to_truth(t_req.grad, want[3], 1e-5, 1e-5, "grad text")


# --- bad input ------------------------------------------------------------------------------------

# --- bad input ----------------------------------------------------------------------------------------

def _bad_loss_cases():
    x, t, t0, labels, s, _ = make_prograd_inputs(4, 3, 5, seed=0)
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


# --- integration ----------------------------------------------------------------------------------

# --- integration -----------------------------------------------------------------------------------

def test_torch_compile_fullgraph(backend, seed):
    name, device = backend
    if name == "triton" and device.type == "cpu":
        pytest.skip("inductor does not run the Triton interpreter on CPU tensors")
    x, t, t0, labels, s, kw = make_prograd_inputs(8, 6, 16, target="classwise", device=device,
                                                  seed=seed)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    def step(x, t, t0, labels, s, table):
        task, kl = fastprompt.prograd_losses(x, t, t0, labels, s, double_softmax=True,
                                             smoothing=0.2, soft_labels=table, temperature=2.0)
        return task + 0.5 * kl

    t_req = t.clone().requires_grad_()
    loss = step(x, t_req, t0, labels, s, kw["soft_labels"])
    loss.backward()
    want = prograd_truth(x, t, t0, labels, s, kw, double_softmax=True, temperature=2.0,
                         weights=(1.0, 0.5))
    assert_close_to_truth(loss, want[0] + 0.5 * want[1], 1e-5, 1e-5, "compiled loss")
    assert_close_to_truth(t_req.grad, want[3], 1e-5, 1e-5, "compiled grad text")


def test_opcheck_cpp_forward(seed):
    x, t, t0, labels, s, kw = make_prograd_inputs(6, 5, 8, target="instancewise", seed=seed)
    # Inputs without requires_grad: the op's autograd is ProGradLossesFunction.
    args = (x, t, t0, labels, s, kw["soft_labels"], kw["sample_index"], 0.2, True, 0.7, True)
    torch.library.opcheck(torch.ops.fastprompt.prograd_losses_forward.default, args)


def test_functorch_vmap_of_the_backward(backend, seed):
    # torch.func.vmap over autograd.grad meets the fused backward ops' vmap rules.
    name, device = backend
    x, t, t0, labels, s, kw = make_prograd_inputs(9, 6, 12, target="uniform", device=device,
                                                  seed=seed)
    t_req = t.clone().requires_grad_()
    task, kl = fastprompt.prograd_losses(x, t_req, t0, labels, s, double_softmax=True, **kw)
    ce = fastprompt.clip_cross_entropy(x, t_req, labels, s, **kw)
    losses = torch.stack([task, kl, ce])
    (rows,) = torch.func.vmap(
        lambda v: torch.autograd.grad(losses, [t_req], v, retain_graph=True))(torch.eye(3, device=device))
    for i, loss in enumerate((task, kl, ce)):
        (want,) = torch.autograd.grad(loss, [t_req], retain_graph=True)
        torch.testing.assert_close(rows[i], want, rtol=1e-6, atol=1e-7)


# --- GCE and MAE as the task loss -------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gce", "mae", "gce-rows"])
@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", ["hard", "uniform", "instancewise"])
def test_backend_gce_logit_gradients_match_formulas(backend, target, double_softmax, kind, seed):
    # The op's own outputs: per-row losses and both logit gradients against autograd through
    # the float64 formulas.
    name, device = backend
    if name == "reference":
        pytest.skip("the reference has no fused forward op (it is checked through autograd)")
    x, t, t0, labels, s, kw = make_prograd_inputs(11, 9, 17, target=target, device=device,
                                                  seed=seed)
    opts = loss_options(kind, 11, device=device, seed=seed)
    q = loss_exponent(opts)
    q_scalar, q_rows = (0.0, q) if torch.is_tensor(q) else (float(q), None)
    soft = kw.get("soft_labels")
    task_rows, kl_rows, grad_task, grad_kl = torch.ops.fastprompt.prograd_losses_forward(
        x, t, t0, labels, s, None if soft is None else soft.float(), kw.get("sample_index"),
        float(kw.get("smoothing", 0.0)), double_softmax, 1.3, True, q_scalar, q_rows)
    z = (s.double() * F.normalize(x.double(), dim=1) @ F.normalize(t.double(), dim=1).T).cpu()
    z0 = (s.double() * F.normalize(x.double(), dim=1) @ F.normalize(t0.double(), dim=1).T).cpu()
    z.requires_grad_()
    kw_cpu = {k: v.cpu() if torch.is_tensor(v) else v for k, v in kw.items()}
    want_task, want_kl = prograd_formula_rows(z, z0, labels.cpu(), float64_target_options(kw_cpu),
                                              double_softmax, 1.3, q)
    (want_grad_task,) = torch.autograd.grad(want_task.sum(), z)
    (want_grad_kl,) = torch.autograd.grad(want_kl.sum(), z)
    for what, a, b in zip(("task rows", "kl rows", "grad task logits", "grad kl logits"),
                          (task_rows, kl_rows, grad_task, grad_kl),
                          (want_task, want_kl, want_grad_task, want_grad_kl)):
        assert_close_to_truth(a, b, 1e-5, 1e-5, what)


@pytest.mark.parametrize("kind", ["mae", "gce-rows"])
@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", ["hard", "classwise"])
def test_backend_gce_matches_float64(backend, target, double_softmax, kind, seed):
    name, device = backend
    n, c, d = (13, 11, 19) if name == "triton" else (37, 53, 70)
    x, t, t0, labels, s, kw = make_prograd_inputs(n, c, d, target=target, device=device, seed=seed)
    opts = dict(double_softmax=double_softmax, temperature=1.6, weights=(0.7, -1.9),
                **loss_options(kind, n, device=device, seed=seed))
    got = prograd_losses_and_grads(fastprompt.prograd_losses, x, t, t0, labels, s, kw, **opts)
    want = prograd_truth(x, t, t0, labels, s, kw, **opts)
    base = prograd_eager(x, t, t0, labels, s, kw, **opts)
    extra = prograd_allowances(x, t, t0, labels, s, kw, double_softmax, 1.6, (0.7, -1.9),
                               q=loss_exponent(opts))
    for what, a, b, e, x_atol in zip(PROGRAD_NAMES, got, want, base, extra):
        assert_close_to_truth(a, b, 1e-5, 1e-5, what, baseline=e, extra_atol=x_atol)


def test_bad_loss_choice_names_the_argument(backend):
    x, t, t0, labels, s, _ = make_prograd_inputs(4, 3, 5, seed=0)
    for kw, exc, arg in (({"loss": "huber"}, ValueError, "loss"),
                         ({"loss": "gce", "q": 2.0}, ValueError, "q"),
                         ({"loss": "gce", "q": torch.zeros(5)}, ValueError, "q")):
        for fn in (fastprompt.prograd_losses, reference.prograd_losses):
            with pytest.raises(exc, match=f"^{arg}"):
                fn(x, t, t0, labels, s, **kw)

