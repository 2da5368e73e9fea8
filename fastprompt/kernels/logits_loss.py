"""Triton entry points of ``fastprompt::logits_cross_entropy_forward`` and
``fastprompt::logits_prograd_losses_forward`` (the CUDA kernels; CPU tensors under
``TRITON_INTERPRET=1``): the loss ops on logits the caller computed.

The row kernel is the one the cuBLAS schedule runs over its stored products
(``clip_loss_forward_kernel`` in its PRODUCTS_STORED mode, ``clip_loss_cublas.py``): one program
per block of rows sweeps the classes in tiles, an online log-sum-exp (with ProGrad's term, those
of ``z/τ`` and ``z⁰/τ``) and the target terms in the first sweep, DSPT's and GCE's sums in a
second where needed, the logit gradients written in the last, every target kind and loss as for
``clip_cross_entropy``. Here the stored products are the caller's logits, read in their own dtype
(float32, bfloat16 or float16; converted to float32 as each tile is loaded, so no float32 copy
exists), with the scale 1 and no normalisation: nothing of the row math is written twice. The
logit gradients are contiguous N x C in the logits' dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from fastprompt.kernels.clip_loss_cublas import row_pass_config
from fastprompt.kernels.clip_loss_forward import (clip_loss_forward_kernel, forward_outputs,
                                                  loss_arguments, target_arguments)
from fastprompt.kernels.launch import on_input_device

__all__ = ["logits_cross_entropy_forward", "logits_prograd_losses_forward", "logits_loss_forward"]


@on_input_device
def logits_loss_forward(logits: torch.Tensor, zeroshot_logits: Optional[torch.Tensor],
                        labels: torch.Tensor, soft_labels: Optional[torch.Tensor],
                        sample_index: Optional[torch.Tensor], smoothing: float,
                        double_softmax: bool, temperature: float, compute_grad: bool,
                        q: float = 0.0, q_rows: Optional[torch.Tensor] = None):
    """One launch of the row kernel over contiguous N x C ``logits`` (and ``zeroshot_logits`` of
    the same shape and dtype for ProGrad's term); returns ``(loss_rows, grad_logits, kl_rows,
    grad_kl_logits)`` as ``clip_loss_forward`` does (validated by the op layer)."""
    n, c = logits.shape
    has_kl = zeroshot_logits is not None
    loss_rows, grad, kl_rows, grad_kl = forward_outputs(logits, c, has_kl, compute_grad)
    target, table, table_rows = target_arguments(labels, soft_labels, sample_index,
                                                 float(smoothing))
    cfg = row_pass_config(c, has_kl)
    # Pointers a specialisation never touches get a stand-in (labels), as in the schedules.
    clip_loss_forward_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        labels, labels, labels, labels, labels, labels, labels,
        labels, labels if table_rows is None else table_rows, labels if table is None else table,
        loss_rows, kl_rows if has_kl else labels, grad if compute_grad else labels,
        grad_kl if compute_grad and has_kl else labels,
        n, c, 0, 1 if table is None else table.shape[0], float(smoothing), float(temperature),
        c, c, TARGET=target, DOUBLE_SOFTMAX=bool(double_softmax), NORMALIZE=False,
        HAS_KL=has_kl, COMPUTE_GRAD=bool(compute_grad), BLOCK_D=16, CAST_FP32=False,
        PRECISION="ieee", xt_ptr=logits, xt0_ptr=zeroshot_logits if has_kl else logits,
        PRODUCTS_STORED=True, SCALED=False, **loss_arguments(q, q_rows), **cfg)
    return loss_rows, grad, kl_rows, grad_kl


def logits_cross_entropy_forward(logits, labels, soft_labels, sample_index, smoothing,
                                 double_softmax, compute_grad, q=0.0, q_rows=None):
    """``fastprompt::logits_cross_entropy_forward``: ``(loss_rows, grad_logits)``."""
    loss_rows, grad, _, _ = logits_loss_forward(logits, None, labels, soft_labels, sample_index,
                                                smoothing, double_softmax, 1.0, compute_grad, q,
                                                q_rows)
    return loss_rows, grad


def logits_prograd_losses_forward(logits, zeroshot_logits, labels, soft_labels, sample_index,
                                  smoothing, double_softmax, temperature, compute_grad, q=0.0,
                                  q_rows=None):
    """``fastprompt::logits_prograd_losses_forward``: ``(task_rows, kl_rows, grad_task_logits,
    grad_kl_logits)``."""
    task_rows, grad_task, kl_rows, grad_kl = logits_loss_forward(
        logits, zeroshot_logits, labels, soft_labels, sample_index, smoothing, double_softmax,
        temperature, compute_grad, q, q_rows)
    return task_rows, kl_rows, grad_task, grad_kl
