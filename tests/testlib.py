"""Shared test utilities: backend/device parametrisation and float64 comparison."""
from __future__ import annotations

import os

import pytest
import torch

from fastprompt import _backend


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
    """Force a backend for the test; yields (backend name, device)."""
    name, device = request.param
    monkeypatch.setenv("FASTPROMPT_BACKEND", name)
    return name, torch.device(device)


def fresh_seed() -> int:
    """A new seed each run (printed by pytest on failure through the test's locals)."""
    return int.from_bytes(os.urandom(4), "little")


def assert_close_to_truth(actual, truth, rtol, atol, name):
    """Compare a result to its float64 truth; atol scales with the truth's magnitude."""
    assert actual is not None, f"{name}: no value"
    actual = actual.detach().double().cpu()
    truth = truth.detach().double().cpu()
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} vs {tuple(truth.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = truth.abs().max().item() if truth.numel() else 0.0
    torch.testing.assert_close(actual, truth, rtol=rtol, atol=atol * max(scale, 1e-3), msg=lambda m: f"{name}: {m}")
