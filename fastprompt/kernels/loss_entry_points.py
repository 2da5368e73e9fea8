"""The loss ops' Triton entry points (the CUDA kernels, and the CPU ones under
``TRITON_INTERPRET=1``): each runs the CUDA schedule that ``FASTPROMPT_CUDA_SCHEDULE`` names
(``schedule_choice.py``), chosen again at every call.
"""
from __future__ import annotations

import contextlib
import importlib

import torch

from fastprompt.kernels.schedule_choice import SCHEDULES, schedule


def _run(fused_module: str, function: str, args):
    """``function`` of the chosen schedule's module, with the device of the first tensor argument
    current: Triton launches on the current device, whatever device the pointers belong to."""
    # By name, at every call: the schedule is read from the environment each time.
    module = importlib.import_module(f"fastprompt.kernels.{SCHEDULES[schedule()] or fused_module}")
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return getattr(module, function)(*args)


def clip_cross_entropy_forward(image_features, text_features, labels, scale, soft_labels,
                               sample_index, smoothing, double_softmax, normalize, compute_grad,
                               q=0.0, q_rows=None):
    """``fastprompt::clip_cross_entropy_forward``: ``(loss_rows, grad_logits)``."""
    loss_rows, grad_logits, _, _ = _run("clip_loss_forward", "clip_loss_forward", (
        image_features, text_features, None, labels, scale, soft_labels, sample_index, smoothing,
        double_softmax, normalize, 1.0, compute_grad, q, q_rows))
    return loss_rows, grad_logits


def prograd_losses_forward(image_features, text_features, zeroshot_text_features, labels, scale,
                           soft_labels, sample_index, smoothing, double_softmax, temperature,
                           compute_grad, q=0.0, q_rows=None):
    """``fastprompt::prograd_losses_forward``: ``(task_rows, kl_rows, grad_task_logits,
    grad_kl_logits)``."""
    task_rows, grad_task, kl_rows, grad_kl = _run("clip_loss_forward", "clip_loss_forward", (
        image_features, text_features, zeroshot_text_features, labels, scale, soft_labels,
        sample_index, smoothing, double_softmax, True, temperature, compute_grad, q, q_rows))
    return task_rows, kl_rows, grad_task, grad_kl


def clip_cross_entropy_backward(*args):
    """``fastprompt::clip_cross_entropy_backward``: ``(grad_image, grad_text, grad_scale)``."""
    return _run("clip_loss_backward", "clip_cross_entropy_backward", args)
