"""logits_cross_entropy and logits_prograd_losses: the reference against the definitions and the
closed-form gradients of docs/math.md (GCE and MAE included, and GCE's limit at q -> 0), every
backend against float64 (every target kind, DSPT, every loss and the per-row choice, odd sizes,
saturated rows, half precision, reductions with upstream weights), bad input, torch.compile,
opcheck, fake tensors and vmap."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt import _backend, reference
from testlib import (LOSS_KINDS, TARGETS, assert_close_to_truth, backend,  # noqa: F401 (fixture)
                     logits_allowances, logits_eager, logits_loss_and_grads,
                     logits_prograd_allowances, logits_prograd_and_grads, logits_prograd_truth,
                     logits_truth, loss_exponent, loss_options, make_inputs, make_logits_inputs,
                     row_logit_terms64, row_losses64, row_weights, target_table64)

NAMES = ("loss", "grad logits")
PROGRAD_NAMES = ("task loss", "kl loss", "grad logits")


def check_logits(z, labels, kw, *, rtol=1e-5, atol=1e-5, dtype=torch.float32, **opts):
    """Every result of ``logits_cross_entropy`` against float64, with the eager reference's error
    in the same precision and the float32 (and half-storage) allowances on the gradient."""
    got = logits_loss_and_grads(fastprompt.logits_cross_entropy, z, labels, kw, **opts)
    want = logits_truth(z, labels, kw, **opts)
    base = logits_eager(z, labels, kw, **opts)
    weights = row_weights(z.shape[0], opts.get("reduction", "mean"), opts.get("upstream"))
    extra = logits_allowances(z, labels, kw, opts.get("double_softmax", False), weights,
                              loss_exponent(opts), dtype)
    for what, a, b, e, x_atol in zip(NAMES, got, want, base, extra):
        assert_close_to_truth(a, b, rtol, atol, what, baseline=e, extra_atol=x_atol)
    return got


# --- the reference against the definitions ----------------------------------------------------

@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", TARGETS)
def test_reference_matches_definitions_and_closed_form_gradients(target, double_softmax, kind,
                                                                 seed):
    # Losses: Σ t (1 - π^q) / q written out (cross-entropy for q = 0 rows). Gradients: autograd
    # through the reference against docs/math.md's ∂ℓ/∂z = π A - a (through the first softmax
    # under DSPT), which is what the kernels write.
    z, labels, kw = make_logits_inputs(17, 9, target=target, dtype=torch.float64, seed=seed)
    opts = loss_options(kind, 17, seed=seed)
    target64 = target_table64(labels, 9, kw)
    z = z.requires_grad_()
    rows = reference.logits_cross_entropy(z, labels, double_softmax=double_softmax,
                                          reduction="none", **kw, **opts)
    q = loss_exponent(opts)
    torch.testing.assert_close(rows, row_losses64(z.detach(), target64, double_softmax, q),
                               rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(rows.sum(), z)
    want, _ = row_logit_terms64(z.detach(), target64, double_softmax, q)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("double_softmax", [False, True])
def test_reference_equals_torch_cross_entropy(double_softmax, seed):
    z, labels, _ = make_logits_inputs(11, 6, dtype=torch.float64, seed=seed)
    ours = reference.logits_cross_entropy(z, labels, double_softmax=double_softmax, smoothing=0.3)
    theirs = F.cross_entropy(torch.softmax(z, 1) if double_softmax else z, labels,
                             label_smoothing=0.3)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", ["hard", "instancewise"])
def test_reference_gradcheck(target, double_softmax, seed):
    z, labels, kw = make_logits_inputs(5, 4, target=target, dtype=torch.float64, seed=seed)
    kw = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
          for k, v in kw.items()}
    q_rows = loss_options("gce-rows", 5, seed=seed)["q"].double()

    def losses(z):
        return reference.logits_cross_entropy(z, labels, double_softmax=double_softmax,
                                              reduction="none", loss="gce", q=q_rows, **kw)

    assert torch.autograd.gradcheck(losses, (z.requires_grad_(),))


@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", ["hard", "classwise"])
def test_gce_tends_to_cross_entropy_as_q_goes_to_0(target, double_softmax, seed):
    # (1 - π^q)/q = -log π - (q/2) log²π - (q²/6) log³π - ...: GCE(q) - CE divided by q tends to
    # -½ Σ t log²π, its error shrinking in proportion to q (a check of the math: the exponent
    # enters the loss and its gradient as the series says, not as a tolerance allows).
    z, labels, kw = make_logits_inputs(13, 7, target=target, dtype=torch.float64, seed=seed)
    target64 = target_table64(labels, 7, kw)
    log_pi = torch.log_softmax(torch.softmax(z, 1) if double_softmax else z, dim=1)
    slope = -0.5 * (target64 * log_pi**2).sum(1)
    curvature = (target64 * log_pi.abs()**3).sum(1) / 6
    ce = reference.logits_cross_entropy(z, labels, double_softmax=double_softmax,
                                        reduction="none", **kw)
    for q in (1e-2, 1e-3, 1e-4):
        gce = reference.logits_cross_entropy(z, labels, double_softmax=double_softmax,
                                             reduction="none", loss="gce", q=q, **kw)
        remainder = ((gce - ce) / q - slope).abs()
        assert (remainder <= 1.01 * q * curvature + 1e-9).all(), (q, remainder.max().item())
    # And the gradients: G(q) → the cross-entropy gradient, at the same linear rate.
    g0, _ = row_logit_terms64(z, target64, double_softmax, 0.0)
    gaps = [(row_logit_terms64(z, target64, double_softmax, q)[0] - g0).abs().max().item()
            for q in (1e-2, 1e-3, 1e-4)]
    assert gaps[1] < 0.2 * gaps[0] and gaps[2] < 0.2 * gaps[1], gaps


def test_reference_per_row_exponents_equal_separate_losses(seed):
    # NLPrompt's choice: q = 0 rows are cross-entropy, q = 1 rows MAE (1 - π_y), others GCE.
    z, labels, kw = make_logits_inputs(12, 5, target="uniform", dtype=torch.float64, seed=seed)
    q = loss_options("gce-rows", 12, seed=seed)["q"]
    rows = reference.logits_cross_entropy(z, labels, reduction="none", loss="gce", q=q, **kw)
    for loss, mask in (("ce", q == 0), ("mae", q == 1)):
        want = reference.logits_cross_entropy(z, labels, reduction="none", loss=loss, **kw)
        torch.testing.assert_close(rows[mask], want[mask], rtol=1e-12, atol=1e-14)
    mae_hard = reference.logits_cross_entropy(z, labels, reduction="none", loss="mae")
    torch.testing.assert_close(mae_hard, 1 - torch.softmax(z, 1)[torch.arange(12), labels])


def test_logits_of_clip_features_equal_clip_cross_entropy(seed):
    # The logits op on z = s x̂ t̂ᵀ is clip_cross_entropy, GCE and DSPT included.
    x, t, labels, s, kw = make_inputs(9, 6, 8, target="classwise", dtype=torch.float64,
                                      seed=seed)
    z = reference.clip_logits(x, t, s)
    for opts in (dict(), dict(double_softmax=True, loss="gce", q=0.3)):
        torch.testing.assert_close(reference.logits_cross_entropy(z, labels, **kw, **opts),
                                   reference.clip_cross_entropy(x, t, labels, s, **kw, **opts),
                                   rtol=1e-12, atol=1e-12)


# --- every backend against float64 ------------------------------------------------------------

@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", TARGETS)
def test_backend_matches_float64(backend, target, double_softmax, kind, seed):
    name, device = backend
    n, c = (13, 11) if name == "triton" else (37, 53)
    z, labels, kw = make_logits_inputs(n, c, target=target, device=device, seed=seed)
    upstream = torch.rand(n, dtype=torch.float64)
    check_logits(z, labels, kw, double_softmax=double_softmax, reduction="none",
                 upstream=upstream, **loss_options(kind, n, device=device, seed=seed))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["ce", "gce-rows"])
def test_backend_reductions(backend, reduction, kind, seed):
    name, device = backend
    z, labels, kw = make_logits_inputs(10, 7, target="instancewise", device=device, seed=seed)
    check_logits(z, labels, kw, double_softmax=True, reduction=reduction,
                 **loss_options(kind, 10, device=device, seed=seed))


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (2, 3), (33, 17), (3, 129)])
@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("kind", ["ce", "gce", "mae"])
def test_backend_odd_sizes(backend, shape, double_softmax, kind, seed):
    # C = 1: every loss is 0 and so is its gradient; C = 129: a tile and one column.
    name, device = backend
    z, labels, kw = make_logits_inputs(*shape, target="uniform", device=device, seed=seed)
    check_logits(z, labels, kw, double_softmax=double_softmax,
                 **loss_options(kind, shape[0], device=device, seed=seed))


@pytest.mark.parametrize("q", [1e-3, 0.999, 1.0])
@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", ["hard", "classwise"])
def test_backend_saturated_rows(backend, target, double_softmax, q, seed):
    # Logits of ±100 (and one row flat): softmax probabilities of e^-200 next to 1, π^q of
    # e^-200q; nothing overflows, and q near 0 and near 1 keep their accuracy.
    name, device = backend
    z, labels, kw = make_logits_inputs(12, 9, target=target, device=device, seed=seed)
    z = torch.where(z > 0, 100.0, -100.0).to(device)
    z[::3, :] = -100.0
    z[::3][torch.arange(4), labels[::3].cpu()] = 100.0  # rows sure of their label
    z[1::3][torch.arange(4), labels[1::3].cpu()] = -100.0  # rows sure it is not
    z[2] = 0.5
    check_logits(z, labels, kw, rtol=1e-4, double_softmax=double_softmax, loss="gce", q=q)


@pytest.mark.parametrize("kind", ["ce", "gce-rows"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("double_softmax", [False, True])
def test_backend_half_precision(backend, dtype, double_softmax, kind, seed):
    # Half-precision logits are read exactly; the losses are float32, the gradient comes back in
    # the logits' dtype, rounded twice (stored by the forward, weighted by the backward).
    name, device = backend
    z, labels, kw = make_logits_inputs(16, 10, target="classwise", device=device, dtype=dtype,
                                       seed=seed)
    loss, grad = check_logits(z, labels, kw, dtype=dtype, double_softmax=double_softmax,
                              **loss_options(kind, 16, device=device, seed=seed))
    assert loss.dtype == torch.float32 and grad.dtype == dtype


def test_backend_per_row_choice_is_one_call(backend, seed):
    # One call with per-row exponents gives each row the loss a separate call of its kind gives.
    name, device = backend
    z, labels, kw = make_logits_inputs(16, 8, target="instancewise", device=device, seed=seed)
    q = loss_options("gce-rows", 16, device=device, seed=seed)["q"]
    rows = fastprompt.logits_cross_entropy(z, labels, reduction="none", double_softmax=True,
                                           loss="gce", q=q, **kw)
    for loss, mask in (("ce", q == 0), ("mae", q == 1)):
        want = fastprompt.logits_cross_entropy(z, labels, reduction="none", double_softmax=True,
                                               loss=loss, **kw)
        if name == "cpp" and loss == "ce":  # q = 0 rows run the cross-entropy rows themselves
            assert torch.equal(rows[mask], want[mask])
        torch.testing.assert_close(rows[mask], want[mask], rtol=1e-6, atol=1e-7)


def test_backend_no_grad_and_strided_logits(backend, seed):
    name, device = backend
    z, labels, kw = make_logits_inputs(9, 12, target="uniform", device=device, seed=seed)
    with torch.no_grad():
        loss = fastprompt.logits_cross_entropy(z, labels, loss="gce", **kw)
    want = logits_truth(z, labels, kw, loss="gce")
    assert_close_to_truth(loss, want[0], 1e-5, 1e-5, "no-grad loss")
    # A transposed view (columns not contiguous) is copied, not misread.
    zt = z.T.contiguous().T
    assert not zt.is_contiguous()
    check_logits(zt, labels, kw, loss="mae")


# --- ProGrad on logits ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ce", "gce-rows"])
@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", ["hard", "instancewise"])
def test_backend_prograd_matches_float64(backend, target, double_softmax, kind, seed):
    name, device = backend
    z, labels, kw = make_logits_inputs(13, 11, target=target, device=device, seed=seed)
    z0 = z + torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    opts = dict(double_softmax=double_softmax, temperature=1.6, weights=(0.7, -1.9),
                **loss_options(kind, 13, device=device, seed=seed))
    got = logits_prograd_and_grads(fastprompt.logits_prograd_losses, z, z0, labels, kw, **opts)
    want = logits_prograd_truth(z, z0, labels, kw, **opts)
    base = logits_prograd_and_grads(reference.logits_prograd_losses, z, z0, labels, kw, **opts)
    extra = logits_prograd_allowances(z, z0, labels, kw, double_softmax, 1.6, (0.7, -1.9),
                                      loss_exponent(opts))
    for what, a, b, e, x_atol in zip(PROGRAD_NAMES, got, want, base, extra):
        assert_close_to_truth(a, b, 1e-5, 1e-5, what, baseline=e, extra_atol=x_atol)


@pytest.mark.parametrize("which", [0, 1])
def test_backend_prograd_one_loss_and_fixed_teacher(backend, which, seed):
    # One loss differentiated at a time (ProGrad's two passes); the teacher gets no gradient.
    name, device = backend
    z, labels, kw = make_logits_inputs(9, 7, target="uniform", device=device, seed=seed)
    z0 = (z.flip(1) * 0.5).requires_grad_()
    weights = (1.0, 0.0) if which == 0 else (0.0, 1.0)
    zr = z.clone().requires_grad_()
    losses = fastprompt.logits_prograd_losses(zr, z0, labels, temperature=2.0, loss="gce", **kw)
    losses[which].backward()
    assert z0.grad is None
    want = logits_prograd_truth(z, z0.detach(), labels, kw, temperature=2.0, loss="gce",
                                weights=weights)
    assert_close_to_truth(zr.grad, want[2], 1e-5, 1e-5, "grad logits")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backend_prograd_half_precision(backend, dtype, seed):
    name, device = backend
    z, labels, kw = make_logits_inputs(16, 10, target="classwise", device=device, dtype=dtype,
                                       seed=seed)
    z0 = (z.float() + 1).to(dtype)
    opts = dict(double_softmax=True, loss="gce", q=0.7, weights=(1.0, 0.5))
    got = logits_prograd_and_grads(fastprompt.logits_prograd_losses, z, z0, labels, kw, **opts)
    assert got[2].dtype == dtype
    want = logits_prograd_truth(z, z0, labels, kw, **opts)
    base = logits_prograd_and_grads(reference.logits_prograd_losses, z, z0, labels, kw, **opts)
    extra = logits_prograd_allowances(z, z0, labels, kw, True, 1.0, (1.0, 0.5), 0.7, dtype)
    for what, a, b, e, x_atol in zip(PROGRAD_NAMES, got, want, base, extra):
        assert_close_to_truth(a, b, 1e-5, 1e-5, what, baseline=e, extra_atol=x_atol)


# --- bad input ------------------------------------------------------------------------------------

def _bad_cases(device):
    z, labels, _ = make_logits_inputs(4, 3, seed=0, device=device)
    table = torch.full((3, 3), 1 / 3, device=device)
    nan_z = z.clone()
    nan_z[1, 2] = float("inf")
    q = torch.tensor([0.0, 1.0, 0.5, 0.2], device=device)
    return [
        ("logits", TypeError, (z.tolist(), labels), {}),
        ("logits", ValueError, (z[0], labels), {}),
        ("logits", ValueError, (z[:0], labels[:0]), {}),
        ("logits", ValueError, (z[:, :0], labels), {}),
        ("logits", TypeError, (z.long(), labels), {}),
        ("logits", ValueError, (nan_z, labels), {}),
        ("labels", TypeError, (z, labels.float()), {}),
        ("labels", ValueError, (z, labels[:3]), {}),
        ("labels", ValueError, (z, torch.tensor([0, 1, 3, 0], device=device)), {}),
        ("smoothing", ValueError, (z, labels), {"smoothing": 1.5}),
        ("soft_labels", ValueError, (z, labels), {"smoothing": 0.1, "soft_labels": table[:2]}),
        ("soft_labels", ValueError, (z, labels), {"smoothing": 0.1, "soft_labels": table * 2}),
        ("sample_index", ValueError, (z, labels),
         {"smoothing": 0.1, "soft_labels": table, "sample_index": torch.tensor([0, 1, 2, 3], device=device)}),
        ("reduction", ValueError, (z, labels), {"reduction": "avg"}),
        ("loss", ValueError, (z, labels), {"loss": "focal"}),
        ("q", ValueError, (z, labels), {"loss": "gce", "q": 1.5}),
        ("q", ValueError, (z, labels), {"loss": "gce", "q": -0.1}),
        ("q", ValueError, (z, labels), {"loss": "gce", "q": float("nan")}),
        ("q", TypeError, (z, labels), {"loss": "gce", "q": "0.5"}),
        ("q", ValueError, (z, labels), {"loss": "gce", "q": q[:3]}),
        ("q", ValueError, (z, labels), {"loss": "mae", "q": q}),
        ("q", ValueError, (z, labels), {"loss": "gce", "q": q * 3}),
        ("q", TypeError, (z, labels), {"loss": "gce", "q": q.long()}),
        ("q", ValueError, (z, labels), {"loss": "gce", "q": q.clone().requires_grad_()}),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases("cpu"))))
def test_bad_input_names_the_argument(backend, case):
    name, device = backend
    arg, exc, args, kw = _bad_cases(device)[case]
    with pytest.raises(exc, match=f"^{arg}"):
        fastprompt.logits_cross_entropy(*args, **kw)


def _bad_prograd_cases():
    z, labels, _ = make_logits_inputs(4, 3, seed=0)
    nan_z0 = z.clone()
    nan_z0[0, 0] = float("nan")
    return [
        ("zeroshot_logits", TypeError, (z, z.tolist(), labels), {}),
        ("zeroshot_logits", ValueError, (z, z[:, :2], labels), {}),
        ("zeroshot_logits", TypeError, (z, z.double(), labels), {}),
        ("zeroshot_logits", ValueError, (z, nan_z0, labels), {}),
        ("temperature", ValueError, (z, z, labels), {"temperature": 0.0}),
        ("q", ValueError, (z, z, labels), {"loss": "gce", "q": 2.0}),
        ("labels", ValueError, (z, z, torch.tensor([0, 1, 3, 0])), {}),
    ]


@pytest.mark.parametrize("case", range(len(_bad_prograd_cases())))
def test_bad_prograd_input_names_the_argument(backend, case):
    arg, exc, args, kw = _bad_prograd_cases()[case]
    with pytest.raises(exc, match=f"^{arg}"):
        fastprompt.logits_prograd_losses(*args, **kw)
    with pytest.raises(exc, match=f"^{arg}"):
        reference.logits_prograd_losses(*args, **kw)


def test_fused_backends_refuse_float64_logits(backend, seed):
    name, device = backend
    z, labels, _ = make_logits_inputs(4, 3, seed=seed, device=device, dtype=torch.float64)
    if name == "reference":
        fastprompt.logits_cross_entropy(z, labels)
        return
    with pytest.raises(TypeError, match="^logits: float64 has no fused"):
        fastprompt.logits_cross_entropy(z, labels)


@pytest.mark.skipif(not _backend.cpp_available(), reason="C++ extension not built")
def test_cpp_kernel_checks_values_itself(seed):
    # The Python layer leaves the logits' finiteness, label, sample-index and per-row exponent
    # checks to the C++ kernels (they read those values anyway).
    z, labels, _ = make_logits_inputs(4, 3, seed=seed)
    bad = z.clone()
    bad[2, 1] = float("nan")
    op = torch.ops.fastprompt.logits_cross_entropy_forward
    with pytest.raises(ValueError, match="^logits: contains NaN or infinite"):
        op(bad, labels, None, None, 0.0, False, True)
    with pytest.raises(ValueError, match=r"^labels: values must lie in \[0, 3\)"):
        op(z, torch.tensor([0, 3, 1, 2]), None, None, 0.0, True, True)
    with pytest.raises(ValueError, match=r"^q: values must lie in \[0, 1\]"):
        op(z, labels, None, None, 0.0, True, True, 0.0, torch.tensor([0.0, 1.0, -0.5, 0.2]))
    with pytest.raises(ValueError, match="^zeroshot_logits: contains NaN or infinite"):
        torch.ops.fastprompt.logits_prograd_losses_forward(z, bad, labels, None, None, 0.0, True,
                                                           1.0, True)


# --- integration: torch.compile, opcheck, fake tensors, vmap ------------------------------------

def test_torch_compile_fullgraph(backend, seed):
    name, device = backend
    if name == "triton" and device.type == "cpu":
        pytest.skip("inductor does not run the Triton interpreter on CPU tensors")
    z, labels, kw = make_logits_inputs(8, 6, target="classwise", device=device, seed=seed)
    q = loss_options("gce-rows", 8, device=device, seed=seed)["q"]
    z0 = z.flip(0)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    def step(z, z0, labels, table, q):
        loss = fastprompt.logits_cross_entropy(z, labels, double_softmax=True, smoothing=0.2,
                                               soft_labels=table, loss="gce", q=q)
        task, kl = fastprompt.logits_prograd_losses(z, z0, labels, loss="mae")
        return loss + task + 0.5 * kl

    zr = z.clone().requires_grad_()
    step(zr, z0, labels, kw["soft_labels"], q).backward()
    zw = z.double().clone().requires_grad_()
    kw64 = {k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()}
    want = (reference.logits_cross_entropy(zw, labels, double_softmax=True, loss="gce", q=q,
                                           **kw64)
            + sum(w * v for w, v in zip((1.0, 0.5), reference.logits_prograd_losses(
                zw, z0.double(), labels, loss="mae"))))
    want.backward()
    assert_close_to_truth(zr.grad, zw.grad, 1e-5, 1e-5, "compiled grad logits")


@pytest.mark.skipif(not _backend.cpp_available(), reason="C++ extension not built")
@pytest.mark.parametrize("per_row", [False, True])
def test_opcheck_cpp_forward(per_row, seed):
    z, labels, kw = make_logits_inputs(6, 5, target="instancewise", seed=seed)
    q, q_rows = (0.0, loss_options("gce-rows", 6, seed=seed)["q"]) if per_row else (0.4, None)
    args = (z, labels, kw["soft_labels"], kw["sample_index"], 0.2, True, True, q, q_rows)
    torch.library.opcheck(torch.ops.fastprompt.logits_cross_entropy_forward.default, args)
    args = (z, z.flip(1), labels, kw["soft_labels"], kw["sample_index"], 0.2, True, 0.7, True,
            q, q_rows)
    torch.library.opcheck(torch.ops.fastprompt.logits_prograd_losses_forward.default, args)


def test_meta_and_fake_tensors_give_shapes():
    # No data-dependent check runs on meta or fake tensors; the fake implementations answer.
    z = torch.empty(6, 5, device="meta", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.empty(6, dtype=torch.int64, device="meta")
    q = torch.empty(6, device="meta")
    for reduction, shape in (("mean", ()), ("none", (6,))):
        loss = fastprompt.logits_cross_entropy(z, labels, reduction=reduction, loss="gce", q=q)
        assert loss.device.type == "meta" and loss.shape == shape and loss.dtype == torch.float32
    loss.sum().backward()
    assert z.grad.shape == (6, 5) and z.grad.dtype == torch.bfloat16
    task, kl = fastprompt.logits_prograd_losses(z, z.detach(), labels)
    assert task.shape == kl.shape == () and task.device.type == "meta"
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        zf = torch.empty(3, 4, requires_grad=True)
        out = fastprompt.logits_cross_entropy(zf, torch.zeros(3, dtype=torch.int64),
                                              reduction="none", loss="mae")
        assert out.shape == (3,)


def test_functorch_vmap_of_the_backward(backend, seed):
    # The backward is a torch product: vmap over autograd.grad batches it.
    name, device = backend
    z, labels, kw = make_logits_inputs(9, 6, target="uniform", device=device, seed=seed)
    zr = z.clone().requires_grad_()
    task, kl = fastprompt.logits_prograd_losses(zr, z.flip(1), labels, loss="gce", **kw)
    ce = fastprompt.logits_cross_entropy(zr, labels, double_softmax=True, **kw)
    losses = torch.stack([task, kl, ce])
    (rows,) = torch.func.vmap(lambda v: torch.autograd.grad(losses, [zr], v, retain_graph=True))(
        torch.eye(3, device=device))
    for i, loss in enumerate((task, kl, ce)):
        (want,) = torch.autograd.grad(loss, [zr], retain_graph=True)
        torch.testing.assert_close(rows[i], want, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not _backend.cpp_available(), reason="C++ extension not built")
def test_ops_registered_by_dispatch_key():
    for op in ("logits_cross_entropy_forward", "logits_prograd_losses_forward"):
        for key in ("CPU", "CUDA", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastprompt::{op}", key), (op, key)
