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


# The fused schedule pads each row of its N x C logit-gradient buffers to a multiple of this many
# elements (C = 1000 -> 1008): with 16-element aligned rows the half-precision loads of the
# backward vectorise to 16 bytes, and so do the forward's stores of whole tiles.
ROW_ALIGNMENT = 16


def padded_columns(c: int) -> int:
    """``c`` rounded up to a multiple of ``ROW_ALIGNMENT``: the fused schedule's row stride."""
    return -(-c // ROW_ALIGNMENT) * ROW_ALIGNMENT


def logit_gradient_buffer(like: torch.Tensor, n: int, c: int, padded: bool) -> torch.Tensor:
    """An N x C tensor in ``like``'s dtype and device; ``padded``: a view of the first C
    columns of an N x ``padded_columns(c)`` allocation (the row stride the backward reads)."""
    if not padded:
        return like.new_empty((n, c))
    return like.new_empty((n, padded_columns(c)))[:, :c]


def with_padded_rows(g: torch.Tensor) -> torch.Tensor:
    """``g`` (N x C) in rows padded with zeros to ``padded_columns(C)``: a view of the first C
    columns, as the fused forward writes its gradients (out of place, so vmap can batch it)."""
    c = g.shape[-1]
    return torch.nn.functional.pad(g, (0, padded_columns(c) - c))[..., :c]


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
