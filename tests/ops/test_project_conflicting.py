"""project_conflicting_: the multi-tensor projection on every backend against a float64
evaluation, strided and empty tensors, bad input, opcheck."""
from __future__ import annotations

import pytest
import torch

import fastprompt
from fastprompt import reference
from testlib import assert_close_to_truth, backend  # noqa: F401 (fixture)


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
def test_backend_projection_matches_float64(backend, lam, seed):
    name, device = backend
    grads, refs = projection_pairs(device, seed)
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


def test_backend_projection_non_contiguous_and_empty(backend):
    name, device = backend
    g = torch.randn(8, 6, device=device).T  # strided view
    h = -g.contiguous() + 0.1 * torch.randn(6, 8, device=device)
    want = projection_truth(g, h, 1.0)
    fastprompt.project_conflicting_([g, torch.empty(0, device=device)], [h, torch.empty(0, device=device)])
    assert_close_to_truth(g, want, 1e-5, 1e-5, "strided grads")
    fastprompt.project_conflicting_([], [])


# --- bad input ------------------------------------------------------------------------------------

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


def test_opcheck_cpp_op(seed):
    grads, refs = projection_pairs("cpu", seed)
    torch.library.opcheck(torch.ops.fastprompt.project_conflicting_.default,
                          (grads, refs, 1.0), test_utils=("test_schema", "test_faketensor"))


# --- in-place semantics: version counters, gradients, aliasing ---------------------------------

def _conflicting_pair(device, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(7, generator=gen)
    h = -g + 0.1 * torch.randn(7, generator=gen)
    return g.to(device), h.to(device)


def test_projection_bumps_version_counters(backend, seed):
    # A graph that saved g must refuse to backpropagate after g was projected in place (the
    # reference's in-place copy does that; the kernels write through raw pointers).
    name, device = backend
    g, h = _conflicting_pair(device, seed)
    w = torch.randn(7, device=device, requires_grad=True)
    y = (w * g).sum()  # mul saves g for w's gradient
    before = g._version
    fastprompt.project_conflicting_([g], [h])
    assert g._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_projection_refuses_tensors_requiring_grad(backend, seed):
    name, device = backend
    g, h = _conflicting_pair(device, seed)
    leaf = g.clone().requires_grad_()
    for fn in (fastprompt.project_conflicting_, reference.project_conflicting_):
        with pytest.raises(ValueError, match=r"^grads\[0\]: requires grad"):
            fn([leaf], [h])
    with torch.no_grad():  # as an optimizer step would: allowed, and projected
        fastprompt.project_conflicting_([leaf], [h])
    assert_close_to_truth(leaf, projection_truth(g, h, 1.0), 1e-5, 1e-5, "projected leaf")


def test_projection_refuses_shared_memory(backend, seed):
    # The same tensor as both arguments, or overlapping views: the backends would each give
    # something else (in place, read while written), so every backend refuses it.
    name, device = backend
    g, h = _conflicting_pair(device, seed)
    base = torch.randn(10, device=device)
    cases = [
        ([g], [g], r"^ref_grads\[0\]: shares memory with grads\[0\]"),
        ([base[:6], base[4:]], [h[:6], h[1:]], r"^grads\[1\]: shares memory with grads\[0\]"),
        ([g, base[:3]], [h, base[2:5]], r"ref_grads\[1\]: shares memory with grads\[1\]|"
                                        r"^grads\[1\]: shares memory with ref_grads\[1\]"),
    ]
    for grads, refs, message in cases:
        before = [x.clone() for x in grads]
        for fn in (fastprompt.project_conflicting_, reference.project_conflicting_):
            with pytest.raises(ValueError, match=message):
                fn(grads, refs)
        for a, b in zip(grads, before):
            assert torch.equal(a, b)
    # Disjoint views of one storage are fine, and a reference shared by two pairs is only read.
    fastprompt.project_conflicting_([base[:5], base[5:]], [h[:5], h[:5]])
