"""Random cases for every op on every backend against an independent float64 computation (the
formulas written out here, not fastprompt.reference): float32, bfloat16 and float16 inputs,
strided views, feature magnitudes from 1e-6 to 1e4, every target option, DSPT, normalisation on
and off, every reduction, ProGrad's losses and the projection.

Fixed seeds (the same cases every run) plus one case from the per-test fresh seed (shown on
failure; FASTPROMPT_TEST_SEED replays it). The Triton interpreter gets fewer, smaller cases.
"""
from __future__ import annotations

import random

import pytest
import torch

import fastprompt
from fastprompt import reference
from testlib import (TARGETS, targets64, assert_close_to_truth, backend,  # noqa: F401 (fixture)
                     float32_logit_error, half_storage_error, propagate_logit_error)

DTYPES = (torch.float32, torch.float32, torch.bfloat16, torch.float16)
FIXED_SEEDS = range(60)
INTERPRETER_SEEDS = range(12)


def _features(rng, gen, rows, d, magnitude, dtype, strided):
    """rows x D features of the given magnitude; optionally a strided view (every other column
    of a wider matrix, or the transpose of a D x rows one)."""
    if strided and rng.random() < 0.5:
        full = torch.randn(rows, 2 * d, generator=gen)[:, ::2]
    elif strided:
        full = torch.randn(d, rows, generator=gen).T
    else:
        full = torch.randn(rows, d, generator=gen)
    return (full * magnitude).to(dtype)


def draw_loss_case(seed, small):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    top = 12 if small else 33
    n, c, d = rng.randint(1, top), rng.randint(1, top), rng.randint(1, top + 7)
    dtype = rng.choice(DTYPES)
    prograd = rng.random() < 0.3
    normalize = prograd or rng.random() < 0.8
    mx, mt = 10 ** rng.uniform(-6, 4), 10 ** rng.uniform(-6, 4)
    if dtype == torch.float16:
        # float16's range: elements (~4.5 sigma) below 65504, and gradients (~1/magnitude)
        # representable too.
        mx, mt = min(max(mx, 1e-3), 1e4), min(max(mt, 1e-3), 1e4)
    x = _features(rng, gen, n, d, mx, dtype, rng.random() < 0.3)
    t = _features(rng, gen, c, d, mt, dtype, rng.random() < 0.3)
    t0 = (t.float() + 0.5 * mt * torch.randn(c, d, generator=gen)).to(dtype)
    # Logits of order 1..100 whatever the magnitudes.
    s = rng.uniform(0.5, 100.0) if normalize else rng.uniform(0.1, 10.0) / (mx * mt * d ** 0.5)
    labels = torch.randint(0, c, (n,), generator=gen)
    target = rng.choice(TARGETS)
    kw = {}
    if target != "hard":
        kw["smoothing"] = rng.uniform(0.05, 1.0)
    if target == "classwise":
        kw["soft_labels"] = torch.softmax(3 * torch.randn(c, c, generator=gen), dim=1)
    if target == "instancewise":
        m = rng.randint(1, 2 * n + 1)
        kw["soft_labels"] = torch.softmax(3 * torch.randn(m, c, generator=gen), dim=1)
        kw["sample_index"] = torch.randint(0, m, (n,), generator=gen)
    return dict(x=x, t=t, t0=t0, labels=labels, scale=torch.tensor(s), kw=kw, prograd=prograd,
                normalize=normalize, double_softmax=rng.random() < 0.5,
                reduction="mean" if prograd else rng.choice(["mean", "sum", "none"]),
                temperature=rng.uniform(0.5, 3.0), grad_image=rng.random() < 0.5,
                upstream=torch.rand(n, generator=gen, dtype=torch.float64) - 0.3)


def _targets64(labels, c, kw):
    table = kw.get("soft_labels")
    if table is not None:  # the table renormalised in float64
        kw = {**kw, "soft_labels": table.double() / table.double().sum(1, keepdim=True)}
    return targets64(labels, c, kw)


def _logits64(x, t, s, normalize):
    if normalize:
        x = x / x.norm(dim=1, keepdim=True)
        t = t / t.norm(dim=1, keepdim=True)
    return s * x @ t.T


def truth64(case):
    """Float64 losses, input gradients and the logit gradient G (rows weighted as reduced)."""
    x = case["x"].double().requires_grad_(case["grad_image"])
    t = case["t"].double().requires_grad_()
    s = case["scale"].double().requires_grad_()
    z = _logits64(x, t, s, case["normalize"])
    z_leaf = z.detach().requires_grad_()
    a = torch.softmax(z_leaf, 1) if case["double_softmax"] else z_leaf
    target = _targets64(case["labels"], z.shape[1], case["kw"])
    rows = torch.logsumexp(a, 1) - (target * a).sum(1)
    if case["prograd"]:
        tau = case["temperature"]
        z0 = _logits64(x.detach(), case["t0"].double(), s.detach(), True)
        kl_rows = -tau**2 * (torch.softmax(z0 / tau, 1) * torch.log_softmax(z_leaf / tau, 1)).sum(1)
        objective = rows.mean() - 0.7 * kl_rows.mean()
        outputs = (rows.mean(), kl_rows.mean())
    else:
        weights = {"mean": torch.full_like(rows, 1 / len(rows)), "sum": torch.ones_like(rows),
                   "none": case["upstream"]}[case["reduction"]]
        objective = (rows * weights).sum()
        outputs = ({"mean": rows.mean(), "sum": rows.sum(), "none": rows}[case["reduction"]],)
    (grad_z,) = torch.autograd.grad(objective, z_leaf)
    z.backward(grad_z)
    return outputs, (x.grad, t.grad, s.grad), grad_z.detach(), z.detach()


def run(fn_loss, case, device):
    x = case["x"].to(device, copy=True).requires_grad_(case["grad_image"])
    t = case["t"].to(device, copy=True).requires_grad_()
    s = case["scale"].to(device, copy=True).requires_grad_()
    kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in case["kw"].items()}
    if case["prograd"]:
        task, kl = fn_loss(x, t, case["t0"].to(device), case["labels"].to(device), s,
                           temperature=case["temperature"], double_softmax=case["double_softmax"],
                           **kw)
        (task - 0.7 * kl).backward()
        outputs = (task, kl)
    else:
        loss = fn_loss(x, t, case["labels"].to(device), s, double_softmax=case["double_softmax"],
                       normalize=case["normalize"], reduction=case["reduction"], **kw)
        (loss if loss.dim() == 0 else (loss * case["upstream"].to(loss))).sum().backward()
        outputs = (loss,)
    return outputs, (x.grad, t.grad, s.grad)


def check_loss_case(case, device):
    fn = fastprompt.prograd_losses if case["prograd"] else fastprompt.clip_cross_entropy
    ref = reference.prograd_losses if case["prograd"] else reference.clip_cross_entropy
    got_out, got_grads = run(fn, case, device)
    want_out, want_grads, grad_z, z = truth64(case)
    base_out, base_grads = run(ref, case, "cpu")  # eager torch in the inputs' precision
    dtype = case["x"].dtype
    # G is a difference of terms up to |p| + |t| (DSPT: p (q + t + Σpq + Σtp)); float32 errs by a
    # few ulps of those, half precision stores G rounded: carried through the closed forms.
    mag = grad_z.abs() + (1.0 / max(len(z), 1))
    error = float32_logit_error(mag * 4)
    if dtype != torch.float32:
        error = error + half_storage_error([grad_z], dtype) * 2
    image, text, scale = propagate_logit_error(error, case["x"], case["t"], case["scale"],
                                               case["normalize"])
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for k, (a, b, e) in enumerate(zip(got_out, want_out, base_out)):
        assert_close_to_truth(a, b, tol, tol, f"loss {k}", baseline=e)
    for what, a, b, e, extra in zip(("grad image", "grad text", "grad scale"), got_grads,
                                    want_grads, base_grads, (image, text, scale)):
        if b is None:
            assert a is None, what
            continue
        assert a.dtype == (case["scale"].dtype if what == "grad scale" else dtype), what
        assert_close_to_truth(a, b, tol, tol, what, baseline=e, extra_atol=extra)


def draw_projection_case(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(rng.randint(1, 4)):
        shape = tuple(rng.randint(1, 9) for _ in range(rng.randint(1, 3)))
        dtype = rng.choice((torch.float32, torch.float64, torch.bfloat16, torch.float16))
        mag, ratio = 10 ** rng.uniform(-6, 4), 10 ** rng.uniform(-2, 2)
        if dtype == torch.float16:  # float16's range
            mag, ratio = min(max(mag, 1e-2), 1e2), min(max(ratio, 0.1), 10.0)
        g = torch.randn(shape, generator=gen) * mag
        h = torch.randn(shape, generator=gen) * mag * ratio
        if rng.random() < 0.5:  # make the pair conflict
            h = h - (2 * (g * h).sum() / (g * g).sum() + 0.5) * g
        if rng.random() < 0.3 and g.dim() >= 2:  # a strided gradient
            g = g.transpose(0, -1).contiguous().transpose(0, -1)
        pairs.append((g.to(dtype), h.to(dtype)))
    return pairs, rng.uniform(0.0, 1.5)


def check_projection_case(pairs, lam, device):
    grads = [g.to(device) for g, _ in pairs]
    refs = [h.to(device) for _, h in pairs]
    want, allowance = [], []
    for g, h in pairs:
        g64, h64 = g.double(), h.double()
        dot = float((g64 * h64).sum())
        coef = lam * dot / float((h64 * h64).sum()) if dot < 0 else 0.0
        want.append(g64 - coef * h64)
        # Rounding of the result (and of the float32 sums) relative to its terms.
        eps = 1e-6 if g.dtype in (torch.float32, torch.float64) else torch.finfo(g.dtype).eps
        allowance.append(4 * eps * (g64.abs() + abs(coef) * h64.abs()))
    fastprompt.project_conflicting_(grads, refs, lam=lam)
    for i, (a, w, e) in enumerate(zip(grads, want, allowance)):
        assert_close_to_truth(a, w, 1e-5, 0.0, f"grads[{i}]", extra_atol=e)


def _seeds(backend_name):
    return INTERPRETER_SEEDS if backend_name == "triton" else FIXED_SEEDS


@pytest.mark.parametrize("index", range(len(FIXED_SEEDS)))
def test_loss_fuzz_fixed_seeds(backend, index):
    name, device = backend
    if index >= len(_seeds(name)):
        pytest.skip("the interpreter runs fewer cases")
    check_loss_case(draw_loss_case(1000 + index, small=name == "triton"), device)


def test_loss_fuzz_fresh_seed(backend, seed):
    name, device = backend
    check_loss_case(draw_loss_case(seed, small=name == "triton"), device)


@pytest.mark.parametrize("index", range(0, len(FIXED_SEEDS), 2))
def test_projection_fuzz_fixed_seeds(backend, index):
    name, device = backend
    check_projection_case(*draw_projection_case(5000 + index), device)


def test_projection_fuzz_fresh_seed(backend, seed):
    name, device = backend
    check_projection_case(*draw_projection_case(seed), device)
