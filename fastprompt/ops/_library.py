"""The ``fastprompt::`` op library: each op's schema is defined once, here; its kernels are
registered by dispatch key, as torchao does it: the C++ kernels for ``CPU`` (``csrc/``,
``TORCH_LIBRARY_IMPL``, loaded with ``fastprompt._C``), the Triton kernels for ``CUDA`` (from
Python, imported on first use), and a fake implementation for meta and fake tensors.

``FASTPROMPT_BACKEND`` stays a Python-level override for tests and debugging: ``reference`` never
reaches the ops, and ``triton`` with CPU tensors (``TRITON_INTERPRET=1``) puts the Triton kernels
on the ``CPU`` key for as long as it is set, so that the interpreter runs behind the same
dispatcher (vmap, opcheck) as a GPU would.

Why ``torch.library.Library`` rather than ``custom_op``: the latter wraps every call in Python
layers that cost more than the kernels at training sizes; autograd lives in each public op's
``autograd.Function`` instead.
"""
from __future__ import annotations

import importlib

import torch

from fastprompt import _backend
from fastprompt.kernels import schedule_choice  # imports no triton

_LIB = torch.library.Library("fastprompt", "DEF")
_TRITON_IMPLS: dict[str, object] = {}
_triton_on_cpu: torch.library.Library | None = None


def define_op(schema: str, fake, triton_impl):
    """Define ``fastprompt::<schema>`` with its fake implementation and ``triton_impl`` for CUDA;
    returns the op (``torch.ops.fastprompt.<name>.default``)."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    torch.library.register_fake(f"fastprompt::{name}", fake, lib=_LIB)
    _LIB.impl(name, triton_impl, "CUDA")
    _TRITON_IMPLS[name] = triton_impl
    return getattr(torch.ops.fastprompt, name).default


def triton_kernel(module: str, function: str):
    """A kernel entry point of ``fastprompt.kernels.<module>``, imported on its first call (so
    that importing fastprompt does not import triton)."""
    def call(*args):
        # Deliberately lazy: the kernel modules import triton, which CPU-only use never needs.
        return getattr(importlib.import_module(f"fastprompt.kernels.{module}"), function)(*args)
    call.__name__ = function
    return call


def backend_for(device: torch.device) -> str:
    """The backend for tensors on ``device`` (``_backend.resolve``); puts the Triton kernels on
    the CPU key while ``triton`` is forced for CPU tensors, and takes them off after."""
    global _triton_on_cpu
    if device.type == "meta":  # shape inference: the ops' fake implementations
        return "meta"
    backend = _backend.resolve(device)
    wanted = backend == "triton" and device.type == "cpu"
    if wanted and _triton_on_cpu is None:
        _triton_on_cpu = torch.library.Library("fastprompt", "IMPL")
        for name, impl in _TRITON_IMPLS.items():
            _triton_on_cpu.impl(name, impl, "CPU", allow_override=True)
    elif not wanted and _triton_on_cpu is not None:
        _triton_on_cpu._destroy()
        _triton_on_cpu = None
    return backend


def pads_logit_gradients(device: torch.device) -> bool:
    """Whether the forward ops' logit gradients on ``device`` come from the fused CUDA schedule,
    whose rows are padded to 16 elements (``kernels/logit_gradient_layout.py``): the fake
    implementations give them the same strides, which torch.compile checks."""
    triton_serves = device.type == "cuda" or (device.type == "cpu" and _triton_on_cpu is not None)
    return triton_serves and schedule_choice.schedule() == "fused"


def refuse_float64(backend: str, dtype: torch.dtype, name: str = "image_features") -> None:
    if dtype == torch.float64 and backend != "meta":
        raise TypeError(f"{name}: float64 has no fused {backend} kernel; use float32, "
                        "bfloat16 or float16, or fastprompt.reference for float64 checks")
