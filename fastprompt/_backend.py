"""Which implementation runs an op: the compiled C++ extension on CPU, Triton on CUDA,
or the plain-torch reference. ``FASTPROMPT_BACKEND=reference|cpp|triton`` forces one.
"""
from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("reference", "cpp", "triton")

_cpp_error: str | None = None
try:  # Registers the C++ CPU kernels of the fastprompt::* ops.
    from fastprompt import _C  # noqa: F401
except Exception as exc:  # noqa: BLE001 - any failure to load means "no C++ backend"
    _cpp_error = f"{type(exc).__name__}: {exc}"

_warned = False


def cpp_available() -> bool:
    return _cpp_error is None


def cpp_error() -> str | None:
    """Why the C++ extension did not load (None when it did)."""
    return _cpp_error


def triton_available() -> bool:
    try:
        # Deliberately here, not at the top: CPU-only use (the C++ kernels) never imports triton.
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _warn_reference_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"fastprompt: {reason}; falling back to the plain-torch reference (slower).",
                      RuntimeWarning, stacklevel=3)


def resolve(device: torch.device) -> str:
    """The backend for tensors on ``device``: forced by FASTPROMPT_BACKEND, else the fastest present."""
    forced = os.environ.get("FASTPROMPT_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"FASTPROMPT_BACKEND: must be one of {BACKENDS}, got {forced!r}")
        if forced == "cpp":
            if device.type != "cpu":
                raise ValueError(f"FASTPROMPT_BACKEND=cpp runs on CPU tensors only, got {device}")
            if not cpp_available():
                raise RuntimeError(f"FASTPROMPT_BACKEND=cpp, but the C++ extension did not load ({_cpp_error})")
        if forced == "triton":
            if not triton_available():
                raise RuntimeError("FASTPROMPT_BACKEND=triton, but triton is not installed")
            if device.type == "cpu" and not triton_interpreting():
                raise ValueError("FASTPROMPT_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 "
                                 "set before triton is imported")
        return forced
    if device.type == "cuda":
        if triton_available():
            return "triton"
        _warn_reference_once("triton is not installed")
        return "reference"
    if device.type == "cpu":
        if cpp_available():
            return "cpp"
        _warn_reference_once(f"the C++ extension could not be loaded ({_cpp_error})")
        return "reference"
    return "reference"
