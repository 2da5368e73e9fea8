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

import contextlib
import importlib
import os

import torch

SCHEDULES = {"cublas": "clip_loss_cublas", "fused": None}
DEFAULT = "cublas"


def schedule() -> str:
    """The schedule named by ``FASTPROMPT_CUDA_SCHEDULE`` (default ``cublas``)."""
    name = os.environ.get("FASTPROMPT_CUDA_SCHEDULE", "").strip().lower() or DEFAULT
    if name not in SCHEDULES:
        raise ValueError(f"FASTPROMPT_CUDA_SCHEDULE: must be one of {tuple(SCHEDULES)}, got "
                         f"{name!r}")
    return name


def _run(fused_module: str, function: str, args):
    """``function`` of the chosen schedule's module, with the device of the first tensor argument
    current: Triton launches on the current device, whatever device the pointers belong to."""
    module = importlib.import_module(f"fastprompt.kernels.{SCHEDULES[schedule()] or fused_module}")
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return getattr(module, function)(*args)


def clip_cross_entropy_forward(image_features, text_features, labels, scale, soft_labels,
                               sample_index, smoothing, double_softmax, normalize, compute_grad):
    """``fastprompt::clip_cross_entropy_forward``: ``(loss_rows, grad_logits)``."""
    loss_rows, grad_logits, _, _ = _run("clip_loss_forward", "clip_loss_forward", (
        image_features, text_features, None, labels, scale, soft_labels, sample_index, smoothing,
        double_softmax, normalize, 1.0, compute_grad))
    return loss_rows, grad_logits


def prograd_losses_forward(image_features, text_features, zeroshot_text_features, labels, scale,
                           soft_labels, sample_index, smoothing, double_softmax, temperature,
                           compute_grad):
    """``fastprompt::prograd_losses_forward``: ``(task_rows, kl_rows, grad_task_logits,
    grad_kl_logits)``."""
    task_rows, grad_task, kl_rows, grad_kl = _run("clip_loss_forward", "clip_loss_forward", (
        image_features, text_features, zeroshot_text_features, labels, scale, soft_labels,
        sample_index, smoothing, double_softmax, True, temperature, compute_grad))
    return task_rows, kl_rows, grad_task, grad_kl


def clip_cross_entropy_backward(*args):
    """``fastprompt::clip_cross_entropy_backward``: ``(grad_image, grad_text, grad_scale)``."""
    return _run("clip_loss_backward", "clip_cross_entropy_backward", args)
