"""clip_cross_entropy: every backend against the float64 reference, plus the reference against
torch's own cross-entropy, bad input, torch.compile and the fallback; GCE and MAE (one exponent or
one per row) the same way."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt import _backend, reference
from testlib import (TARGETS, assert_close_to_truth, backend,  # noqa: F401 (fixture)
                     clip_allowances, clip_eager, clip_loss_and_grads, clip_truth, float32_logit_error,
                     logit_terms64,
                     loss_exponent, loss_options, make_inputs, propagate_logit_error,
                     row_weights)


def tolerance(dtype, backend_name):
    if dtype == torch.float32:
        return 1e-5, 1e-5
    return 2e-2, 2e-2


# --- the reference against independent formulas ------------------------------------------------

@pytest.mark.parametrize("double_softmax", [False, True])
def test_reference_equals_torch_cross_entropy(double_softmax, seed):
    x, t, labels, s, _ = make_inputs(23, 9, 12, dtype=torch.float64, seed=seed)
    z = s * F.normalize(x, dim=1) @ F.normalize(t, dim=1).T
    if double_softmax:
        z = torch.softmax(z, dim=1)
    for eps in (0.0, 0.3):
        kw = {"smoothing": eps} if eps else {}
        ours = reference.clip_cross_entropy(x, t, labels, s, double_softmax=double_softmax, **kw)
        theirs = F.cross_entropy(z, labels, label_smoothing=eps)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_reference_soft_tables_select_rows(seed):
    # A class-wise table whose rows are one-hot on the label equals hard targets; an instance-wise
    # table indexed by sample_index picks each sample's own row.
    x, t, labels, s, _ = make_inputs(10, 6, 8, dtype=torch.float64, seed=seed)
    eye = torch.eye(6, dtype=torch.float64)
    hard = reference.clip_cross_entropy(x, t, labels, s)
    assert torch.allclose(reference.clip_cross_entropy(x, t, labels, s, smoothing=0.7, soft_labels=eye), hard)
    table = torch.softmax(torch.randn(10, 6, dtype=torch.float64), 1)
    idx = torch.arange(10).flip(0)
    z = s * F.normalize(x, dim=1) @ F.normalize(t, dim=1).T
    target = 0.6 * F.one_hot(labels, 6).double() + 0.4 * table[idx]
    expected = -(target * torch.log_softmax(z, 1)).sum(1).mean()
    got = reference.clip_cross_entropy(x, t, labels, s, smoothing=0.4, soft_labels=table, sample_index=idx)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", TARGETS)
def test_reference_gradcheck(target, double_softmax, seed):
    x, t, labels, s, kw = make_inputs(5, 4, 3, target=target, seed=seed)
    kw = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
    x, t, s = (v.double().requires_grad_() for v in (x, t, s))
    fn = lambda x, t, s: reference.clip_cross_entropy(x, t, labels, s, double_softmax=double_softmax, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, t, s))


# --- every backend against the float64 reference -----------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", TARGETS)
def test_backend_matches_float64(backend, target, double_softmax, reduction, seed):
    name, device = backend
    n, c, d = (13, 11, 19) if name == "triton" else (37, 53, 70)
    x, t, labels, s, kw = make_inputs(n, c, d, target=target, device=device, seed=seed)
    upstream = torch.rand(n, dtype=torch.float64)
    opts = dict(double_softmax=double_softmax, reduction=reduction, upstream=upstream)
    got = clip_loss_and_grads(fastprompt.clip_cross_entropy, x, t, labels, s, kw, **opts)
    want = clip_truth(x, t, labels, s, kw, **opts)
    base = clip_eager(x, t, labels, s, kw, **opts)
    rtol, atol = tolerance(torch.float32, name)
    extra = clip_allowances(x, t, labels, s, kw, double_softmax,
                            row_weights(n, reduction, upstream))
    for what, a, b, e, x_atol in zip(("loss", "grad image", "grad text", "grad scale"), got, want,
                                     base, extra):
        assert_close_to_truth(a, b, rtol, atol, what, baseline=e, extra_atol=x_atol)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 3), (5, 1, 16), (2, 3, 129), (33, 17, 5)])
@pytest.mark.parametrize("double_softmax", [False, True])
def test_backend_odd_sizes(backend, shape, double_softmax, seed):
    name, device = backend
    x, t, labels, s, kw = make_inputs(*shape, target="uniform", device=device, seed=seed)
    got = clip_loss_and_grads(fastprompt.clip_cross_entropy, x, t, labels, s, kw,
                              double_softmax=double_softmax)
    want = clip_truth(x, t, labels, s, kw, double_softmax=double_softmax)
    base = clip_eager(x, t, labels, s, kw, double_softmax=double_softmax)
    extra = clip_allowances(x, t, labels, s, kw, double_softmax,
                            row_weights(shape[0]))
    for what, a, b, e, x_atol in zip(("loss", "grad image", "grad text", "grad scale"), got, want,
                                     base, extra):
        assert_close_to_truth(a, b, 1e-5, 1e-5, what, baseline=e, extra_atol=x_atol)


@pytest.mark.parametrize("double_softmax", [False, True])
def test_backend_unnormalized_features(backend, double_softmax, seed):
    name, device = backend
    x, t, labels, s, kw = make_inputs(9, 6, 10, target="classwise", device=device, scale=0.3,
                                      seed=seed)
    opts = dict(double_softmax=double_softmax, normalize=False)
    got = clip_loss_and_grads(fastprompt.clip_cross_entropy, x, t, labels, s, kw, **opts)
    want = clip_truth(x, t, labels, s, kw, **opts)
    base = clip_eager(x, t, labels, s, kw, **opts)
    extra = clip_allowances(x, t, labels, s, kw, double_softmax,
                            row_weights(9), normalize=False)
    for what, a, b, e, x_atol in zip(("loss", "grad image", "grad text", "grad scale"), got, want,
                                     base, extra):
        assert_close_to_truth(a, b, 1e-5, 1e-5, what, baseline=e, extra_atol=x_atol)


@pytest.mark.parametrize("double_softmax", [False, True])
def test_backend_extreme_logits(backend, double_softmax, seed):
    # scale 100 with image rows equal to class rows: logits of 100 next to -100, no NaN allowed.
    name, device = backend
    x, t, labels, s, kw = make_inputs(12, 8, 16, target="uniform", device=device, scale=100.0,
                                      seed=seed)
    x = t[labels].clone()
    x[::2] = -x[::2]  # half the samples point away from their class: huge loss, tiny softmax
    got = clip_loss_and_grads(fastprompt.clip_cross_entropy, x, t, labels, s, kw,
                              double_softmax=double_softmax)
    want = clip_truth(x, t, labels, s, kw, double_softmax=double_softmax)
    base = clip_eager(x, t, labels, s, kw, double_softmax=double_softmax)
    extra = clip_allowances(x, t, labels, s, kw, double_softmax,
                            row_weights(12))
    for what, a, b, e, x_atol in zip(("loss", "grad image", "grad text", "grad scale"), got, want,
                                     base, extra):
        assert_close_to_truth(a, b, 1e-4, 1e-5, what, baseline=e, extra_atol=x_atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("double_softmax", [False, True])
def test_backend_half_precision(backend, dtype, double_softmax, seed):
    name, device = backend
    x, t, labels, s, kw = make_inputs(16, 10, 24, target="instancewise", device=device, dtype=dtype,
                                      seed=seed)
    got = clip_loss_and_grads(fastprompt.clip_cross_entropy, x, t, labels, s, kw,
                              double_softmax=double_softmax)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == dtype and got[2].dtype == dtype
    want = clip_truth(x, t, labels, s, kw, double_softmax=double_softmax)
    base = clip_eager(x, t, labels, s, kw, double_softmax=double_softmax)
    # The fused kernels store the logit gradient in the input dtype; the scale's gradient, a sum
    # that cancels, gets the rounding bound of that storage on top of the relative tolerance.
    extra = clip_allowances(x, t, labels, s, kw, double_softmax,
                            row_weights(16), dtype=dtype)
    for what, a, b, e, x_atol in zip(("loss", "grad image", "grad text", "grad scale"), got, want,
                                     base, extra):
        assert_close_to_truth(a, b, 2e-2, 2e-2, what, baseline=e, extra_atol=x_atol)


def test_backend_frozen_image_features_and_no_grad(backend, seed):
    name, device = backend
    x, t, labels, s, kw = make_inputs(11, 7, 9, target="classwise", device=device, seed=seed)
    t_req = t.clone().requires_grad_()
    loss = fastprompt.clip_cross_entropy(x, t_req, labels, s, double_softmax=True, **kw)
    loss.backward()
    assert t_req.grad is not None and x.grad is None
    with torch.no_grad():
        again = fastprompt.clip_cross_entropy(x, t, labels, s, double_softmax=True, **kw)
    want = clip_truth(x, t, labels, s, kw, double_softmax=True)
    assert_close_to_truth(again, want[0], 1e-5, 1e-5, "no-grad loss")
    assert_close_to_truth(t_req.grad, want[2], 1e-5, 1e-5, "grad text")


def test_backend_python_float_scale(backend, seed):
    name, device = backend
    x, t, labels, s, kw = make_inputs(6, 5, 7, device=device, seed=seed)
    a = fastprompt.clip_cross_entropy(x, t, labels, 12.5)
    b = reference.clip_cross_entropy(x.double(), t.double(), labels, 12.5)
    assert_close_to_truth(a, b, 1e-5, 1e-5, "loss")


@pytest.mark.parametrize("double_softmax", [False, True])
def test_backend_float64_scale(backend, double_softmax, seed):
    # A float64 logit scale with float32 features: the scale's gradient comes back in float64
    # (the fused backward ops return it in the scale's dtype), forward and opcheck agree.
    name, device = backend
    x, t, labels, s, kw = make_inputs(10, 7, 12, device=device, seed=seed)
    s64 = s.double().requires_grad_()
    t_req = t.clone().requires_grad_()
    loss = fastprompt.clip_cross_entropy(x, t_req, labels, s64, double_softmax=double_softmax)
    loss.backward()
    assert s64.grad.dtype == torch.float64
    want = clip_truth(x, t, labels, s, kw, double_softmax=double_softmax)
    assert_close_to_truth(s64.grad, want[3], 1e-4, 1e-5, "grad scale")
    if name != "reference":
        _, grad_logits = torch.ops.fastprompt.clip_cross_entropy_forward(
            x, t, labels, s64.detach(), None, None, 0.0, double_softmax, True, True)
        grad_rows = torch.full((10,), 0.1, device=device)
        out = torch.ops.fastprompt.clip_cross_entropy_backward(
            grad_rows, grad_logits, x, t, s64.detach(), True, False, True, True)
        assert out[2].dtype == torch.float64
        if name == "cpp":
            torch.library.opcheck(torch.ops.fastprompt.clip_cross_entropy_backward.default,
                                  (grad_rows, grad_logits, x, t, s64.detach(), True, True, True,
                                   True))


# --- bad input: every backend, a clear error naming the argument ----------------------------------

def _bad_cases(device):
    x, t, labels, s, _ = make_inputs(4, 3, 5, seed=0, device=device)
    table = torch.full((3, 3), 1 / 3, device=device)
    nan_x = x.clone()
    nan_x[1, 2] = float("nan")
    zero_t = t.clone()
    zero_t[0] = 0
    return [
        ("image_features", TypeError, (x.tolist(), t, labels, s), {}),
        ("image_features", ValueError, (x[0], t, labels, s), {}),
        ("image_features", ValueError, (x[:0], t, labels[:0], s), {}),
        ("text_features", ValueError, (x, t[:, :4], labels, s), {}),
        ("text_features", TypeError, (x, t.double(), labels, s), {}),
        ("labels", TypeError, (x, t, labels.float(), s), {}),
        ("labels", ValueError, (x, t, labels[:3], s), {}),
        ("labels", ValueError, (x, t, torch.tensor([0, 1, 3, 0], device=device), s), {}),
        ("labels", ValueError, (x, t, torch.tensor([0, -1, 2, 0], device=device), s), {}),
        ("image_features", ValueError, (nan_x, t, labels, s), {}),
        ("text_features", ValueError, (x, zero_t, labels, s), {}),
        ("scale", ValueError, (x, t, labels, float("inf")), {}),
        ("scale", ValueError, (x, t, labels, torch.tensor(float("nan"), device=device)), {}),
        ("scale", TypeError, (x, t, labels, "10"), {}),
        ("scale", ValueError, (x, t, labels, torch.ones(3, device=device)), {}),
        ("smoothing", ValueError, (x, t, labels, s), {"smoothing": -0.1}),
        ("smoothing", ValueError, (x, t, labels, s), {"smoothing": 1.5}),
        ("soft_labels", ValueError, (x, t, labels, s), {"smoothing": 0.1, "soft_labels": table[:, :2]}),
        ("soft_labels", ValueError, (x, t, labels, s), {"smoothing": 0.1, "soft_labels": table[:2]}),
        ("soft_labels", ValueError, (x, t, labels, s), {"smoothing": 0.1, "soft_labels": table * 2}),
        ("sample_index", ValueError, (x, t, labels, s),
         {"smoothing": 0.1, "soft_labels": table, "sample_index": torch.tensor([0, 1, 2, 3], device=device)}),
        ("sample_index", ValueError, (x, t, labels, s),
         {"smoothing": 0.1, "sample_index": torch.tensor([0, 1, 2, 0], device=device)}),
        ("reduction", ValueError, (x, t, labels, s), {"reduction": "avg"}),
        ("loss", ValueError, (x, t, labels, s), {"loss": "GCE"}),
        ("q", ValueError, (x, t, labels, s), {"loss": "gce", "q": 1.01}),
        ("q", TypeError, (x, t, labels, s), {"loss": "gce", "q": None}),
        ("q", ValueError, (x, t, labels, s), {"loss": "gce", "q": torch.ones(3, device=device)}),
        ("q", ValueError, (x, t, labels, s), {"loss": "ce", "q": torch.ones(4, device=device)}),
        ("q", ValueError, (x, t, labels, s),
         {"loss": "gce", "q": torch.tensor([0.0, 0.5, float("nan"), 1.0], device=device)}),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases("cpu"))))
def test_bad_input_names_the_argument(backend, case):
    name, device = backend
    arg, exc, args, kw = _bad_cases(device)[case]
    with pytest.raises(exc, match=f"^{arg}"):
        fastprompt.clip_cross_entropy(*args, **kw)


@pytest.mark.skipif(not _backend.cpp_available(), reason="C++ extension not built")
@pytest.mark.parametrize("normalize", [True, False])
def test_cpp_kernel_checks_values_itself(normalize, seed):
    # The Python layer leaves the value checks of features, scale, labels and sample indices to
    # the C++ kernels (the features' come free with the row norms), so the op itself must refuse
    # them, e.g. where torch.compile skips Python.
    x, t, labels, s, _ = make_inputs(4, 3, 5, seed=seed)
    nan_x, zero_t = x.clone(), t.clone()
    nan_x[2, 1] = float("inf")
    zero_t[1] = 0
    op = torch.ops.fastprompt.clip_cross_entropy_forward
    with pytest.raises(ValueError, match="^image_features: contains NaN or infinite"):
        op(nan_x, t, labels, s, None, None, 0.0, True, normalize, True)
    if normalize:
        with pytest.raises(ValueError, match="^text_features: a row has zero norm"):
            op(x, zero_t, labels, s, None, None, 0.0, False, normalize, False)
    else:  # a zero row is fine without normalisation
        op(x, zero_t, labels, s, None, None, 0.0, False, normalize, False)
    with pytest.raises(ValueError, match=r"^labels: values must lie in \[0, 3\)"):
        op(x, t, torch.tensor([0, 3, 1, 2]), s, None, None, 0.0, True, normalize, True)
    with pytest.raises(ValueError, match="^scale: must be finite"):
        op(x, t, labels, torch.tensor(float("nan")), None, None, 0.0, True, normalize, True)
    table = torch.full((5, 3), 1 / 3)
    with pytest.raises(ValueError, match=r"^sample_index: values must lie in \[0, 5\)"):
        op(x, t, labels, s, table, torch.tensor([0, 4, 5, 1]), 0.1, True, normalize, True)


# --- integration: torch.compile, opcheck, fallback ---------------------------------------------------

def test_torch_compile_fullgraph(backend, seed):
    name, device = backend
    if name == "triton" and device.type == "cpu":
        pytest.skip("inductor does not run the Triton interpreter on CPU tensors")
    x, t, labels, s, kw = make_inputs(8, 6, 16, target="classwise", device=device, seed=seed)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    def step(x, t, labels, s, table):
        return fastprompt.clip_cross_entropy(x, t, labels, s, double_softmax=True, smoothing=0.2,
                                             soft_labels=table)

    t_req = t.clone().requires_grad_()
    loss = step(x, t_req, labels, s, kw["soft_labels"])
    loss.backward()
    want = clip_truth(x, t, labels, s, kw, double_softmax=True)
    assert_close_to_truth(loss, want[0], 1e-5, 1e-5, "compiled loss")
    assert_close_to_truth(t_req.grad, want[2], 1e-5, 1e-5, "compiled grad text")


@pytest.mark.skipif(not _backend.cpp_available(), reason="C++ extension not built")
def test_opcheck_cpp_forward(seed):
    x, t, labels, s, kw = make_inputs(6, 5, 8, target="instancewise", seed=seed)
    # Inputs without requires_grad: the op's autograd is ClipCrossEntropyFunction, not an
    # autograd kernel of the op (its gradients are checked against float64 above).
    args = (x, t, labels, s, kw["soft_labels"], kw["sample_index"], 0.2, True, True, True)
    torch.library.opcheck(torch.ops.fastprompt.clip_cross_entropy_forward.default, args)


def test_missing_extension_falls_back_to_reference(monkeypatch, seed):
    monkeypatch.delenv("FASTPROMPT_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_cpp_error", "ImportError: simulated")
    monkeypatch.setattr(_backend, "_warned", False)
    x, t, labels, s, kw = make_inputs(5, 4, 6, target="uniform", seed=seed)
    with pytest.warns(RuntimeWarning, match="falling back to the plain-torch reference"):
        got = fastprompt.clip_cross_entropy(x, t, labels, s, **kw)
    assert_close_to_truth(got, clip_truth(x, t, labels, s, kw)[0], 1e-5, 1e-5, "fallback loss")


def test_unknown_backend_is_refused(monkeypatch, seed):
    monkeypatch.setenv("FASTPROMPT_BACKEND", "cuda-magic")
    x, t, labels, s, _ = make_inputs(3, 2, 4, seed=seed)
    with pytest.raises(ValueError, match="^FASTPROMPT_BACKEND"):
        fastprompt.clip_cross_entropy(x, t, labels, s)


# --- hostile input: extreme magnitudes, meta tensors, soft labels requiring grad ---------------

@pytest.mark.parametrize("x_scale,t_scale", [(1e20, 1.0), (1.0, 1e-25), (1e30, 1e30), (1e-30, 1e-30),
                                             (1e20, 1e-25)])
@pytest.mark.parametrize("double_softmax", [False, True])
def test_backend_extreme_feature_magnitudes(backend, x_scale, t_scale, double_softmax, seed):
    # Normalised rows do not depend on their length: huge or tiny finite rows give the same loss
    # as ordinary ones, in every backend (the norms are taken over rows scaled by their peak).
    name, device = backend
    x, t, labels, s, kw = make_inputs(9, 7, 12, target="uniform", device=device, seed=seed)
    x, t = x * x_scale, t * t_scale
    got = clip_loss_and_grads(fastprompt.clip_cross_entropy, x, t, labels, s, kw,
                              double_softmax=double_softmax)
    want = clip_truth(x, t, labels, s, kw, double_softmax=double_softmax)
    # The allowances of the same problem at ordinary magnitudes: there the loss and the scale's
    # gradient are the same, and the feature gradients larger by the magnitude.
    eager_base = clip_eager(x / x_scale, t / t_scale, labels, s, kw, double_softmax=double_softmax)
    extra = clip_allowances(x / x_scale, t / t_scale, labels, s, kw, double_softmax, row_weights(9))
    for what, a, b, e, x_atol, k in zip(("loss", "grad image", "grad text", "grad scale"), got,
                                        want, eager_base, extra, (1.0, x_scale, t_scale, 1.0)):
        # Compared at ordinary magnitudes (float64 rescaling is exact up to rounding).
        assert_close_to_truth(a.double() * k, b * k, 1e-5, 1e-5, what, baseline=e,
                              extra_atol=x_atol)


def test_meta_tensors_give_shapes(seed):
    # Shape inference on meta tensors: no data-dependent check runs, the ops' fake kernels answer.
    x = torch.empty(6, 8, device="meta", requires_grad=True)
    t = torch.empty(5, 8, device="meta", requires_grad=True)
    labels = torch.empty(6, dtype=torch.int64, device="meta")
    table = torch.empty(5, 5, device="meta")
    for reduction, shape in (("mean", ()), ("none", (6,))):
        loss = fastprompt.clip_cross_entropy(x, t, labels, torch.tensor(10.0, device="meta"),
                                             smoothing=0.1, soft_labels=table, double_softmax=True,
                                             reduction=reduction)
        assert loss.device.type == "meta" and loss.shape == shape and loss.dtype == torch.float32
    loss.sum().backward()
    assert t.grad.shape == (5, 8) and t.grad.device.type == "meta"
    task, kl = fastprompt.prograd_losses(x, t, t.detach(), labels, 10.0)
    assert task.shape == kl.shape == () and task.device.type == "meta"


def test_soft_labels_requiring_grad_are_refused(backend, seed):
    # The tables are fixed targets: every backend refuses one that requires grad rather than
    # backpropagating into it in one backend and silently not in the others.
    name, device = backend
    x, t, labels, s, kw = make_inputs(5, 4, 6, target="classwise", device=device, seed=seed)
    table = kw["soft_labels"].clone().requires_grad_()
    for fn in (fastprompt.clip_cross_entropy, reference.clip_cross_entropy):
        with pytest.raises(ValueError, match="^soft_labels: requires grad"):
            fn(x, t, labels, s, smoothing=0.2, soft_labels=table)
    with torch.no_grad():  # nothing to differentiate: accepted
        fastprompt.clip_cross_entropy(x, t, labels, s, smoothing=0.2, soft_labels=table)
    fastprompt.clip_cross_entropy(x, t, labels, s, smoothing=0.2, soft_labels=table.detach())


@pytest.mark.parametrize("cuda_schedule", ["cublas", "fused"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backend_half_precision_large_batch(backend, dtype, cuda_schedule, seed, monkeypatch):
    # Both CUDA schedules scale the half-precision operands of the backward (the fused one in its
    # own product kernel, the cuBLAS one before torch.mm); the schedule means nothing elsewhere.
    if backend[0] != "triton" and cuda_schedule != "cublas":
        pytest.skip("the CUDA schedule only applies to the Triton backend")
    monkeypatch.setenv("FASTPROMPT_CUDA_SCHEDULE", cuda_schedule)
    # At N = 4096 the mean's 1/N times x̂ falls below float16's smallest normal (6e-5): folded
    # into the rounded operand of Gᵀ X̂ as it is, it would lose up to a few percent of each small
    # component, coherently when the rows agree. Every row here is the same image with
    # components spread over three decades, all of one class.
    name, device = backend
    n, c, d = 4096, 3, 16
    gen = torch.Generator().manual_seed(seed)
    v = torch.logspace(0, -3, d) * torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0)
    x = v.expand(n, d).to(device, dtype)
    t = torch.randn(c, d, generator=gen).to(device, dtype)
    labels = torch.zeros(n, dtype=torch.int64, device=device)
    s = torch.tensor(20.0, device=device)
    t_req = t.clone().requires_grad_()
    fastprompt.clip_cross_entropy(x, t_req, labels, s).backward()
    _, _, want, _ = clip_truth(x, t, labels, s, {}, grad_image=False)
    # Allowance: G stored in the dtype and the operand x̂ rounded to a normal number of the dtype
    # (half an ulp each, a few ulps of |G|ᵀ|X̂| carried through), and the gradient itself rounded
    # once to the dtype (half an ulp, or a subnormal step). The stored rows are N G, the mean's
    # 1/N kept out: an improbable class's N G can still be subnormal, off by up to half the
    # subnormal spacing in every row alike (the rows are one image), i.e. that over N in G. And
    # G = p - onehot is a float32 difference: near p_y = 1 it errs by ulps of its terms.
    info = torch.finfo(dtype)
    _, grad, mag = logit_terms64(x, t, labels, s, {}, False, row_weights(n))
    subnormal = info.smallest_normal * info.eps
    error = float32_logit_error(mag) + 3 * info.eps * grad.abs() + subnormal / (2 * n)
    _, text_allowance, _ = propagate_logit_error(error, x, t, s)
    assert_close_to_truth(t_req.grad, want, info.eps / 2, 0.0, "grad text",
                          extra_atol=text_allowance + info.smallest_normal * info.eps)


@pytest.mark.skipif(not _backend.cpp_available(), reason="C++ extension not built")
def test_ops_registered_by_dispatch_key():
    # One namespace: each schema defined once (in Python), the C++ kernels on the CPU key (the
    # extension registers them before the Python definition runs), Triton on CUDA, fakes on Meta.
    for op in ("clip_cross_entropy_forward", "clip_cross_entropy_backward",
               "prograd_losses_forward", "project_conflicting_"):
        for key in ("CPU", "CUDA", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastprompt::{op}", key), (op, key)
    assert not [name for name in torch._C._dispatch_get_all_op_names()
                if name.startswith("fastprompt_cpp::")]


# --- GCE and MAE (issue 21): one exponent, or one per row ---------------------------------------

def check_gce(x, t, labels, s, kw, *, rtol=1e-5, atol=1e-5, dtype=torch.float32, **opts):
    got = clip_loss_and_grads(fastprompt.clip_cross_entropy, x, t, labels, s, kw, **opts)
    want = clip_truth(x, t, labels, s, kw, **opts)
    base = clip_eager(x, t, labels, s, kw, **opts)
    weights = row_weights(x.shape[0], opts.get("reduction", "mean"), opts.get("upstream"))
    extra = clip_allowances(x, t, labels, s, kw, opts.get("double_softmax", False), weights,
                            normalize=opts.get("normalize", True), dtype=dtype,
                            q=loss_exponent(opts))
    for what, a, b, e, x_atol in zip(("loss", "grad image", "grad text", "grad scale"), got, want,
                                     base, extra):
        assert_close_to_truth(a, b, rtol, atol, what, baseline=e, extra_atol=x_atol)
    return got


@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", ["hard", "instancewise"])
def test_reference_gce_gradcheck(target, double_softmax, seed):
    x, t, labels, s, kw = make_inputs(5, 4, 3, target=target, seed=seed)
    kw = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
    q = loss_options("gce-rows", 5, seed=seed)["q"].double()
    x, t, s = (v.double().requires_grad_() for v in (x, t, s))
    fn = lambda x, t, s: reference.clip_cross_entropy(  # noqa: E731
        x, t, labels, s, double_softmax=double_softmax, loss="gce", q=q, **kw)
    assert torch.autograd.gradcheck(fn, (x, t, s))


@pytest.mark.parametrize("kind", ["gce", "mae", "gce-rows"])
@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", TARGETS)
def test_backend_gce_matches_float64(backend, target, double_softmax, kind, seed):
    name, device = backend
    n, c, d = (13, 11, 19) if name == "triton" else (37, 53, 70)
    x, t, labels, s, kw = make_inputs(n, c, d, target=target, device=device, seed=seed)
    upstream = torch.rand(n, dtype=torch.float64)
    check_gce(x, t, labels, s, kw, double_softmax=double_softmax, reduction="none",
              upstream=upstream, **loss_options(kind, n, device=device, seed=seed))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backend_gce_reductions(backend, reduction, seed):
    name, device = backend
    x, t, labels, s, kw = make_inputs(10, 7, 9, target="classwise", device=device, seed=seed)
    check_gce(x, t, labels, s, kw, double_softmax=True, reduction=reduction,
              **loss_options("gce-rows", 10, device=device, seed=seed))


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 3), (5, 1, 16), (2, 3, 129), (33, 17, 5)])
@pytest.mark.parametrize("double_softmax", [False, True])
def test_backend_gce_odd_sizes(backend, shape, double_softmax, seed):
    name, device = backend
    x, t, labels, s, kw = make_inputs(*shape, target="uniform", device=device, seed=seed)
    check_gce(x, t, labels, s, kw, double_softmax=double_softmax,
              **loss_options("gce-rows", shape[0], device=device, seed=seed))


@pytest.mark.parametrize("q", [1e-3, 1.0])
@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", ["hard", "uniform"])
def test_backend_gce_saturated_rows(backend, target, double_softmax, q, seed):
    # scale 100 with image rows equal (or opposite) to their class rows: logits of ±100, π^q of
    # e^{-200 q} next to 1; q near 0 (GCE close to cross-entropy) and at 1 (MAE).
    name, device = backend
    x, t, labels, s, kw = make_inputs(12, 8, 16, target=target, device=device, scale=100.0,
                                      seed=seed)
    x = t[labels].clone()
    x[::2] = -x[::2]
    check_gce(x, t, labels, s, kw, rtol=1e-4, double_softmax=double_softmax, loss="gce", q=q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("double_softmax", [False, True])
def test_backend_gce_half_precision(backend, dtype, double_softmax, seed):
    name, device = backend
    x, t, labels, s, kw = make_inputs(16, 10, 24, target="instancewise", device=device,
                                      dtype=dtype, seed=seed)
    got = check_gce(x, t, labels, s, kw, rtol=2e-2, atol=2e-2, dtype=dtype,
                    double_softmax=double_softmax,
                    **loss_options("gce-rows", 16, device=device, seed=seed))
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype


def test_backend_per_row_choice_is_one_call(backend, seed):
    # NLPrompt: clean rows cross-entropy (q = 0), the others MAE (q = 1), in one call; each row
    # as a call of its own kind gives it (the C++ kernel runs the cross-entropy rows themselves).
    name, device = backend
    x, t, labels, s, kw = make_inputs(14, 9, 12, target="classwise", device=device, seed=seed)
    clean = torch.rand(14, generator=torch.Generator().manual_seed(seed)) < 0.5
    q = torch.where(clean, 0.0, 1.0).to(device)
    rows = fastprompt.clip_cross_entropy(x, t, labels, s, reduction="none", loss="gce", q=q,
                                         double_softmax=True, **kw)
    for loss, mask in (("ce", clean), ("mae", ~clean)):
        want = fastprompt.clip_cross_entropy(x, t, labels, s, reduction="none", loss=loss,
                                             double_softmax=True, **kw)
        if name == "cpp" and loss == "ce":
            assert torch.equal(rows[mask.to(device)], want[mask.to(device)])
        torch.testing.assert_close(rows[mask.to(device)], want[mask.to(device)], rtol=1e-6,
                                   atol=1e-7)


def test_torch_compile_fullgraph_gce(backend, seed):
    name, device = backend
    if name == "triton" and device.type == "cpu":
        pytest.skip("inductor does not run the Triton interpreter on CPU tensors")
    x, t, labels, s, kw = make_inputs(8, 6, 16, target="uniform", device=device, seed=seed)
    q = loss_options("gce-rows", 8, device=device, seed=seed)["q"]
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    def step(x, t, labels, s, q):
        return (fastprompt.clip_cross_entropy(x, t, labels, s, loss="gce", q=q, **kw)
                + fastprompt.prograd_losses(x, t, t.detach(), labels, s, loss="mae")[0])

    t_req = t.clone().requires_grad_()
    step(x, t_req, labels, s, q).backward()
    t64 = t.double().requires_grad_()
    (reference.clip_cross_entropy(x.double(), t64, labels, s.double(), loss="gce", q=q, **kw)
     + reference.prograd_losses(x.double(), t64, t.double(), labels, s.double(),
                                loss="mae")[0]).backward()
    assert_close_to_truth(t_req.grad, t64.grad, 1e-5, 1e-5, "compiled grad text")


@pytest.mark.skipif(not _backend.cpp_available(), reason="C++ extension not built")
def test_opcheck_cpp_forward_gce(seed):
    x, t, labels, s, kw = make_inputs(6, 5, 8, target="classwise", seed=seed)
    q = loss_options("gce-rows", 6, seed=seed)["q"]
    for extra in ((0.5, None), (0.0, q)):
        args = (x, t, labels, s, kw["soft_labels"], None, 0.2, True, True, True, *extra)
        torch.library.opcheck(torch.ops.fastprompt.clip_cross_entropy_forward.default, args)
    with pytest.raises(ValueError, match=r"^q: values must lie in \[0, 1\]"):
        torch.ops.fastprompt.clip_cross_entropy_forward(x, t, labels, s, None, None, 0.0, True,
                                                        True, True, 0.0, q + 1)

