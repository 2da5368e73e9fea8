"""Which CUDA schedule runs the loss ops: ``FASTPROMPT_CUDA_SCHEDULE=cublas|fused``, read at every
call (default ``cublas``).

* ``cublas`` (``clip_loss_cublas.py``): the products by cuBLAS, one Triton row pass per chunk of
  samples; its time follows from cuBLAS's rates at these shapes, hence the default until GPU
  measurements say otherwise.
* ``fused`` (``clip_loss_forward.py``, ``clip_loss_backward.py``): one Triton kernel per
  direction that recomputes the products tile by tile and never stores them.

Both schedules keep the ops' contracts, so the backward of one accepts the forward outputs of the
other; ``loss_entry_points.py`` runs the one chosen here. This module imports no triton (the ops'
fake implementations ask it which strides the logit gradients get).
"""
from __future__ import annotations

import os

# Each schedule's module under fastprompt.kernels; None: the fused modules, one per direction.
SCHEDULES = {"cublas": "clip_loss_cublas", "fused": None}
DEFAULT = "cublas"


def schedule() -> str:
    """The schedule named by ``FASTPROMPT_CUDA_SCHEDULE`` (default ``cublas``)."""
    name = os.environ.get("FASTPROMPT_CUDA_SCHEDULE", "").strip().lower() or DEFAULT
    if name not in SCHEDULES:
        raise ValueError(f"FASTPROMPT_CUDA_SCHEDULE: must be one of {tuple(SCHEDULES)}, got "
                         f"{name!r}")
    return name
