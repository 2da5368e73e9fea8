"""Both CUDA schedules of the loss ops (``FASTPROMPT_CUDA_SCHEDULE=cublas|fused``) against the
float64 reference: every target kind, DSPT, GCE/MAE, ProGrad, odd and small shapes, half precision, the
fused schedule's split paths forced at test sizes, and the forward of one schedule with the
backward of the other. On a machine without a GPU the Triton kernels run under the interpreter
on CPU tensors. The schedules' own modules (the choice, the cuBLAS forward's chunks, the split
counts, the gradient buffers' layout) are tested in tests/kernels/."""
from __future__ import annotations

import os

import pytest
import torch

import fastprompt
from fastprompt import _backend
from fastprompt.kernels import schedule_choice
from testlib import (PROGRAD_NAMES, TARGETS, assert_close_to_truth, clip_allowances, clip_eager,
                     clip_loss_and_grads, clip_truth, logit_terms64, loss_exponent,
                     loss_options, make_inputs,
                     make_prograd_inputs, prograd_allowances, prograd_eager,
                     prograd_half_allowances, prograd_losses_and_grads, prograd_truth,
                     row_weights)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
pytestmark = pytest.mark.skipif(
    not _backend.triton_available() or (DEVICE == "cpu" and not INTERPRET),
    reason="needs triton, and TRITON_INTERPRET=1 without a GPU")
CLIP_NAMES = ("loss", "grad image", "grad text", "grad scale")


@pytest.fixture(params=sorted(schedule_choice.SCHEDULES))
def schedule(request, monkeypatch):
    """The Triton backend under one schedule; afterwards the CPU key gets its C++ kernels back."""
    from fastprompt.ops._library import backend_for

    monkeypatch.setenv("FASTPROMPT_BACKEND", "triton")
    monkeypatch.setenv("FASTPROMPT_CUDA_SCHEDULE", request.param)
    yield request.param
    monkeypatch.delenv("FASTPROMPT_BACKEND")
    backend_for(torch.device("cpu"))


def check_clip(x, t, labels, s, kw, rtol=1e-5, atol=1e-5, dtype=torch.float32, **opts):
    got = clip_loss_and_grads(fastprompt.clip_cross_entropy, x, t, labels, s, kw, **opts)
    want = clip_truth(x, t, labels, s, kw, **opts)
    base = clip_eager(x, t, labels, s, kw, **opts)
    weights = row_weights(x.shape[0], opts.get("reduction", "mean"), opts.get("upstream"))
    extra = clip_allowances(x, t, labels, s, kw, opts.get("double_softmax", False), weights,
                            normalize=opts.get("normalize", True), dtype=dtype,
                            q=loss_exponent(opts))
    for what, a, b, e, x_atol in zip(CLIP_NAMES, got, want, base, extra):
        assert_close_to_truth(a, b, rtol, atol, what, baseline=e, extra_atol=x_atol)


def check_prograd(x, t, t0, labels, s, kw, rtol=1e-5, atol=1e-5, extra=None, **opts):
    got = prograd_losses_and_grads(fastprompt.prograd_losses, x, t, t0, labels, s, kw, **opts)
    want = prograd_truth(x, t, t0, labels, s, kw, **opts)
    base = prograd_eager(x, t, t0, labels, s, kw, **opts)
    if extra is None and x.dtype == torch.float32:
        extra = prograd_allowances(x, t, t0, labels, s, kw, opts.get("double_softmax", False),
                                   opts.get("temperature", 1.0), opts.get("weights", (1.0, 1.0)),
                                   q=loss_exponent(opts))
    extra = extra if extra is not None else (0.0,) * 5
    for what, a, b, e, x_atol in zip(PROGRAD_NAMES, got, want, base, extra):
        assert_close_to_truth(a, b, rtol, atol, what, baseline=e, extra_atol=x_atol)


@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", TARGETS)
def test_clip_cross_entropy_matches_float64(schedule, target, double_softmax, seed):
    x, t, labels, s, kw = make_inputs(13, 11, 19, target=target, device=DEVICE, seed=seed)
    upstream = torch.rand(13, dtype=torch.float64)
    check_clip(x, t, labels, s, kw, double_softmax=double_softmax, reduction="none",
               upstream=upstream)


@pytest.mark.parametrize("double_softmax", [False, True])
def test_unnormalized_features(schedule, double_softmax, seed):
    x, t, labels, s, kw = make_inputs(9, 6, 10, target="classwise", device=DEVICE, scale=0.3,
                                      seed=seed)
    check_clip(x, t, labels, s, kw, double_softmax=double_softmax, normalize=False)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 3), (5, 1, 16), (2, 3, 129), (33, 17, 5)])
def test_odd_sizes(schedule, shape, seed):
    x, t, labels, s, kw = make_inputs(*shape, target="uniform", device=DEVICE, seed=seed)
    check_clip(x, t, labels, s, kw, double_softmax=True)
    x, t, t0, labels, s, kw = make_prograd_inputs(*shape, target="uniform", device=DEVICE,
                                                  seed=seed)
    got = prograd_losses_and_grads(fastprompt.prograd_losses, x, t, t0, labels, s, kw,
                                   double_softmax=True)
    want = prograd_truth(x, t, t0, labels, s, kw, double_softmax=True)
    for what, a, b in zip(PROGRAD_NAMES, got, want):
        # As in test_prograd_losses: C = 1 or N = 1 give results near 0 by cancellation, where
        # float32 keeps an absolute error of ~eps · s.
        torch.testing.assert_close(a.detach().double().cpu(), b.detach().double().cpu(),
                                   rtol=1e-5, atol=1e-5, msg=lambda m, what=what: f"{what}: {m}")


@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", TARGETS)
def test_prograd_losses_match_float64(schedule, target, double_softmax, seed):
    x, t, t0, labels, s, kw = make_prograd_inputs(13, 11, 19, target=target, device=DEVICE,
                                                  seed=seed)
    check_prograd(x, t, t0, labels, s, kw, double_softmax=double_softmax, temperature=1.6,
                  weights=(0.7, -1.9))


@pytest.mark.parametrize("double_softmax", [False, True])
def test_extreme_logits(schedule, double_softmax, seed):
    # scale 100, image rows on (or opposite to) their class rows: logits of ±100, no NaN.
    x, t, labels, s, kw = make_inputs(12, 8, 16, target="uniform", device=DEVICE, scale=100.0,
                                      seed=seed)
    x = t[labels].clone()
    x[::2] = -x[::2]
    check_clip(x, t, labels, s, kw, rtol=1e-4, double_softmax=double_softmax)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cublas_half_precision_with_tiny_row_weights(monkeypatch, dtype, seed):
    # Upstream row gradients of ~1e-6 (a mean over 10⁶ samples) are folded into the
    # half-precision image operand of Gᵀ X̂: unscaled, its elements (~1e-6 / sqrt(D)) would be
    # float16 subnormals and the text gradient off by several percent (75 % at 1e-7). Feature rows
    # of norm ~1e-3 keep the gradients themselves (~1 / ‖t‖) normal numbers in float16.
    from fastprompt.ops._library import backend_for

    monkeypatch.setenv("FASTPROMPT_BACKEND", "triton")
    monkeypatch.setenv("FASTPROMPT_CUDA_SCHEDULE", "cublas")
    x, t, labels, s, kw = make_inputs(16, 10, 24, target="instancewise", device=DEVICE,
                                      dtype=dtype, seed=seed)
    x, t = x * 2**-13, t * 2**-13
    weight = 1e-6
    upstream = weight * (0.5 + torch.rand(16, dtype=torch.float64))
    opts = dict(double_softmax=True, reduction="none", upstream=upstream)
    got = clip_loss_and_grads(fastprompt.clip_cross_entropy, x, t, labels, s, kw, **opts)
    want = clip_truth(x, t, labels, s, kw, **opts)
    base = clip_eager(x, t, labels, s, kw, **opts)
    # The logit gradient is stored unweighted: its rounding bound (allowances) is taken at
    # weights of order 1 and scaled by the weight, which the tolerance is then relative to.
    extra = clip_allowances(x, t, labels, s, kw, True, upstream / weight, dtype=dtype)
    for what, a, b, e, x_atol in zip(CLIP_NAMES, got, want, base, extra):
        if what != "loss":
            x_atol = x_atol * weight
        assert_close_to_truth(a, b, 2e-2, 2e-2, what, baseline=e, extra_atol=x_atol)
    monkeypatch.delenv("FASTPROMPT_BACKEND")
    backend_for(torch.device("cpu"))


def test_forward_of_one_schedule_backward_of_the_other(monkeypatch, seed):
    # The schedule is read at every call and both keep the ops' contracts: the saved logit
    # gradient of either forward serves either backward.
    from fastprompt.ops._library import backend_for

    monkeypatch.setenv("FASTPROMPT_BACKEND", "triton")
    x, t, labels, s, kw = make_inputs(13, 11, 19, target="classwise", device=DEVICE, seed=seed)
    want = clip_truth(x, t, labels, s, kw, double_softmax=True)
    try:
        for first, second in (("fused", "cublas"), ("cublas", "fused")):
            monkeypatch.setenv("FASTPROMPT_CUDA_SCHEDULE", first)
            x_req, t_req = x.clone().requires_grad_(), t.clone().requires_grad_()
            loss = fastprompt.clip_cross_entropy(x_req, t_req, labels, s, double_softmax=True,
                                                 **kw)
            monkeypatch.setenv("FASTPROMPT_CUDA_SCHEDULE", second)
            loss.backward()
            assert_close_to_truth(loss, want[0], 1e-5, 1e-5, f"{first} loss")
            assert_close_to_truth(x_req.grad, want[1], 1e-5, 1e-5, f"{second} grad image")
            assert_close_to_truth(t_req.grad, want[2], 1e-5, 1e-5, f"{second} grad text")
    finally:
        monkeypatch.delenv("FASTPROMPT_BACKEND")
        backend_for(torch.device("cpu"))


# --- the fused schedule's split paths, forced at test sizes --------------------------------------

class _LaunchLog:
    """A Triton kernel stand-in that records the grid and keyword options of each launch, then
    runs the kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def fused_split_paths(monkeypatch):
    """The fused schedule at tiles of 16 with the paths that its host code takes only at GPU
    sizes forced at N=33, C=37, D=20: each row block's classes split into two ranges (the second
    one partial, the first two tiles; passes 1-3 and the merges), both backward products' reductions
    split into two slices (whole tiles, then a masked partial tile), and a GROUP_M=2 swizzle
    over 3 x 2 output tiles (a partial group). Yields the launch logs."""
    from fastprompt.kernels import clip_loss_backward, clip_loss_forward
    from fastprompt.ops._library import backend_for

    monkeypatch.setenv("FASTPROMPT_BACKEND", "triton")
    monkeypatch.setenv("FASTPROMPT_CUDA_SCHEDULE", "fused")
    monkeypatch.setattr(clip_loss_forward, "forward_config", lambda *shape: dict(
        BLOCK_N=16, BLOCK_C=16, BLOCK_D=16, C_SPLITS=2))
    monkeypatch.setattr(clip_loss_backward, "matmul_config", lambda *shape: dict(
        BLOCK_M=16, BLOCK_K=16, BLOCK_D=16, GROUP_M=2, K_SLICES=2))
    logs = dict(forward=_LaunchLog(clip_loss_forward.clip_loss_forward_kernel),
                products=_LaunchLog(clip_loss_backward._grad_matmul_kernel))
    monkeypatch.setattr(clip_loss_forward, "clip_loss_forward_kernel", logs["forward"])
    monkeypatch.setattr(clip_loss_backward, "_grad_matmul_kernel", logs["products"])
    backend_for(torch.device("cpu"))  # the Triton kernels on the CPU key, for direct op calls
    yield logs
    monkeypatch.delenv("FASTPROMPT_BACKEND")
    backend_for(torch.device("cpu"))


SPLIT_SHAPE = (33, 37, 20)


def assert_split_paths_ran(logs, double_softmax, grad=True):
    passes = [(grid, kwargs.get("PASS", 0)) for grid, kwargs in logs["forward"].launches]
    wanted = ([((3, 2), 1)] + ([((3, 2), 2)] if double_softmax else [])
              + [((3, 2 if grad else 1), 3)])
    assert passes == wanted
    if grad:  # every product launch: 3 x 2 output tiles (swizzled), 2 slices
        assert logs["products"].launches
        assert all(grid == (6, 2) for grid, _ in logs["products"].launches)


@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", TARGETS)
def test_fused_split_paths_match_float64(fused_split_paths, target, double_softmax, seed):
    x, t, labels, s, kw = make_inputs(*SPLIT_SHAPE, target=target, device=DEVICE, seed=seed)
    upstream = torch.rand(SPLIT_SHAPE[0], dtype=torch.float64)
    check_clip(x, t, labels, s, kw, double_softmax=double_softmax, reduction="none",
               upstream=upstream)
    assert_split_paths_ran(fused_split_paths, double_softmax)


@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", ["hard", "instancewise"])
def test_fused_split_paths_prograd_match_float64(fused_split_paths, target, double_softmax, seed):
    # Both losses differentiated: the backward reads their combined, padded gradient buffer.
    x, t, t0, labels, s, kw = make_prograd_inputs(*SPLIT_SHAPE, target=target, device=DEVICE,
                                                  seed=seed)
    check_prograd(x, t, t0, labels, s, kw, double_softmax=double_softmax, temperature=1.6,
                  weights=(0.7, -1.9))
    assert_split_paths_ran(fused_split_paths, double_softmax)


def test_fused_split_paths_float16(fused_split_paths, seed):
    x, t, labels, s, kw = make_inputs(*SPLIT_SHAPE, target="classwise", device=DEVICE,
                                      dtype=torch.float16, seed=seed)
    check_clip(x, t, labels, s, kw, rtol=2e-2, atol=2e-2, dtype=torch.float16,
               double_softmax=True)


def test_fused_split_paths_prograd_bfloat16(fused_split_paths, seed):
    x, t, t0, labels, s, kw = make_prograd_inputs(*SPLIT_SHAPE, target="classwise",
                                                  device=DEVICE, dtype=torch.bfloat16, seed=seed)
    check_prograd(x, t, t0, labels, s, kw, 2e-2, 2e-2, double_softmax=True,
                  extra=prograd_half_allowances(x, t, t0, labels, s, kw, torch.bfloat16))


def test_fused_split_paths_without_grad_and_unnormalized(fused_split_paths, seed):
    # Without a gradient the last pass only merges (one program per row block).
    x, t, labels, s, kw = make_inputs(*SPLIT_SHAPE, target="uniform", device=DEVICE, seed=seed)
    with torch.no_grad():
        loss = fastprompt.clip_cross_entropy(x, t, labels, s, double_softmax=True, **kw)
    assert_close_to_truth(loss, clip_truth(x, t, labels, s, kw, double_softmax=True)[0], 1e-5,
                          1e-5, "no-grad loss")
    assert_split_paths_ran(fused_split_paths, True, grad=False)
    x, t, labels, s, kw = make_inputs(*SPLIT_SHAPE, target="classwise", device=DEVICE, scale=0.3,
                                      seed=seed)
    check_clip(x, t, labels, s, kw, double_softmax=False, normalize=False)


def test_fused_logit_gradient_rows_are_padded(fused_split_paths, seed):
    # The forward op's logit gradient: rows of 48 elements for C = 37, the 11 padding columns
    # written as zeros; the backward op reads it (and is bitwise reproducible run to run).
    x, t, labels, s, kw = make_inputs(*SPLIT_SHAPE, target="instancewise", device=DEVICE,
                                      seed=seed)
    args = (x, t, labels, s, kw["soft_labels"], kw["sample_index"], kw["smoothing"], True, True,
            True)
    loss_rows, grad_logits = torch.ops.fastprompt.clip_cross_entropy_forward(*args)
    assert grad_logits.shape == (33, 37) and grad_logits.stride() == (48, 1)
    rows = grad_logits.as_strided((33, 48), (48, 1))
    assert torch.equal(rows[:, 37:], torch.zeros(33, 11))
    _, want, _ = logit_terms64(x, t, labels, s, kw, True, torch.ones(33, dtype=torch.float64))
    assert_close_to_truth(grad_logits, want, 1e-5, 1e-5, "grad logits")
    grad_rows = torch.rand(33, generator=torch.Generator().manual_seed(seed))
    backward = torch.ops.fastprompt.clip_cross_entropy_backward
    first = backward(grad_rows, grad_logits, x, t, s, True, True, True, True)
    again = backward(grad_rows, grad_logits, x, t, s, True, True, True, True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# --- GCE and MAE under both schedules, and through the fused schedule's split paths -------------

@pytest.mark.parametrize("kind", ["gce", "gce-rows"])
@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", TARGETS)
def test_gce_matches_float64(schedule, target, double_softmax, kind, seed):
    x, t, labels, s, kw = make_inputs(13, 11, 19, target=target, device=DEVICE, seed=seed)
    upstream = torch.rand(13, dtype=torch.float64)
    check_clip(x, t, labels, s, kw, double_softmax=double_softmax, reduction="none",
               upstream=upstream, **loss_options(kind, 13, device=DEVICE, seed=seed))


@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("target", TARGETS)
def test_fused_split_paths_gce_match_float64(fused_split_paths, target, double_softmax, seed):
    # GCE's sums in the class ranges and their merge (F and E over softmax(z), F and the target
    # weights' spread under the double softmax), one exponent per row.
    x, t, labels, s, kw = make_inputs(*SPLIT_SHAPE, target=target, device=DEVICE, seed=seed)
    upstream = torch.rand(SPLIT_SHAPE[0], dtype=torch.float64)
    check_clip(x, t, labels, s, kw, double_softmax=double_softmax, reduction="none",
               upstream=upstream, **loss_options("gce-rows", SPLIT_SHAPE[0], device=DEVICE,
                                                 seed=seed))
    assert_split_paths_ran(fused_split_paths, double_softmax)


@pytest.mark.parametrize("double_softmax", [False, True])
def test_fused_split_paths_prograd_gce(fused_split_paths, double_softmax, seed):
    x, t, t0, labels, s, kw = make_prograd_inputs(*SPLIT_SHAPE, target="uniform", device=DEVICE,
                                                  seed=seed)
    check_prograd(x, t, t0, labels, s, kw, double_softmax=double_softmax, temperature=1.6,
                  weights=(0.7, -1.9), loss="mae")
    assert_split_paths_ran(fused_split_paths, double_softmax)


@pytest.mark.parametrize("q", [1e-3, 1.0])
def test_fused_split_paths_gce_saturated(fused_split_paths, q, seed):
    # Logits of ±100 whose maxima lie in different class ranges: the merge rescales F and E.
    x, t, labels, s, kw = make_inputs(*SPLIT_SHAPE, target="classwise", device=DEVICE,
                                      scale=100.0, seed=seed)
    x = t[labels].clone()
    x[::2] = -x[::2]
    check_clip(x, t, labels, s, kw, rtol=1e-4, loss="gce", q=q)

