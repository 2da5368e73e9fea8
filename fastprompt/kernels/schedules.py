"""Which CUDA schedule runs the loss ops: ``FASTPROMPT_CUDA_SCHEDULE=cublas|fused``, read at every
call (default ``cublas``).

* ``cublas`` (``clip_loss_cublas.py``): the products by cuBLAS, one Triton row pass per chunk of
  samples; its time follows from cuBLAS's rates at these shapes, hence the default until GPU
  measurements say otherwise.
* ``fused`` (``clip_loss_forward.py``, ``clip_loss_backward.py``): one Triton kernel per
  direction that recomputes the products tile by tile and never stores them.

These are the ops' Triton entry points (the CUDA kernels, and the CPU ones under
``TRITON_INTERPRET=1``); both schedules keep the ops' contracts, so the backward of one accepts
the forward outputs of the other.
"""
from __future__ import annotations

import importlib
import os

SCHEDULES = {"cublas": "clip_loss_cublas", "fused": None}
DEFAULT = "cublas"


def schedule() -> str:
    """The schedule named by ``FASTPROMPT_CUDA_SCHEDULE`` (default ``cublas``)."""
    name = os.environ.get("FASTPROMPT_CUDA_SCHEDULE", "").strip().lower() or DEFAULT
    if name not in SCHEDULES:
        raise ValueError(f"FASTPROMPT_CUDA_SCHEDULE: must be one of {tuple(SCHEDULES)}, got "
                         f"{name!r}")
    return name


def _module(fused_module: str):
    cublas_module = SCHEDULES[schedule()]
    return importlib.import_module(f"fastprompt.kernels.{cublas_module or fused_module}")


def clip_cross_entropy_forward(*args):
    return _module("clip_loss_forward").clip_cross_entropy_forward(*args)


def prograd_losses_forward(*args):
    return _module("clip_loss_forward").prograd_losses_forward(*args)


def clip_cross_entropy_backward(*args):
    return _module("clip_loss_backward").clip_cross_entropy_backward(*args)
