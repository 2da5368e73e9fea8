"""``fastprompt.prograd_backward``: ProGrad's backward, the projected task gradient accumulated
into each parameter's ``.grad`` (docs/math.md)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from fastprompt._validation import check_prograd_backward_args
from fastprompt.ops.project_conflicting import project_pairs_


def _two_pass_grads(task_loss: Tensor, kl_loss: Tensor, params: list[Tensor]):
    """``h = ∇kl_loss`` (graph retained), then ``g = ∇task_loss`` (graph freed), as the official
    code's two ``backward`` calls."""
    ref_grads = torch.autograd.grad(kl_loss, params, retain_graph=True, allow_unused=True)
    grads = torch.autograd.grad(task_loss, params, allow_unused=True)
    # Projected in place and kept as .grad: dense memory (a gradient may be an expanded view).
    return [None if g is None else g.contiguous() for g in grads], list(ref_grads)


def _batched_grads(task_loss: Tensor, kl_loss: Tensor, params: list[Tensor]):
    """``g`` and ``h`` from one backward with a batch of two grad outputs (``is_grads_batched``)."""
    dtype = torch.promote_types(task_loss.dtype, kl_loss.dtype)
    losses = torch.stack([task_loss.reshape(()).to(dtype), kl_loss.reshape(()).to(dtype)])
    batched = torch.autograd.grad(losses, params, torch.eye(2, dtype=dtype, device=losses.device),
                                  is_grads_batched=True, allow_unused=True)
    # Slices of the batched results, cloned so that ``g`` does not keep ``h`` alive.
    return ([None if b is None else b[0].clone(memory_format=torch.contiguous_format)
             for b in batched],
            [None if b is None else b[1] for b in batched])


def prograd_backward(task_loss: Tensor, kl_loss: Tensor, params: Iterable[Tensor],
                     lam: float = 1.0, *, batched: Optional[bool] = None) -> None:
    """ProGrad's backward: accumulate the projected task gradient into each ``param.grad``.

    Equal, up to float rounding, to the official procedure (``kl_loss.backward(retain_graph=True)``,
    copy the gradients ``h``, ``task_loss.backward()`` for ``g``, project each ``g`` against its
    ``h``; ``fastprompt.reference.prograd_backward``); the projection is one fused multi-tensor
    kernel with the sign test on the device. The graph is freed afterwards, as
    ``task_loss.backward()`` would.

    How ``g`` and ``h`` are obtained depends on the device: on CPU two ``autograd.grad`` passes
    (the first with ``retain_graph``), which measured faster there than the batched backward
    (``bench/results/prograd-cpu.md``); on CUDA one batched backward (``is_grads_batched``), one
    walk of the graph with twice-as-wide kernels, where launches and small matmuls dominate.

    Args:
        task_loss, kl_loss: scalar losses sharing a graph (from ``prograd_losses``, or any two).
        params: the tensors to update (leaves requiring grad, e.g. the prompt context); each
            ``param.grad`` is added to as ``backward()`` would (set when it is None).
        lam: λ >= 0 of the projection.
        batched: force the batched backward (True) or the two passes (False); None picks per
            device as above.
    """
    params = list(params) if not isinstance(params, Tensor) else [params]
    for p, g in zip(params, projected_task_grads(task_loss, kl_loss, params, lam, batched=batched)):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)


def projected_task_grads(task_loss: Tensor, kl_loss: Tensor, params: Iterable[Tensor],
                         lam: float = 1.0, *, batched: Optional[bool] = None) -> list[Optional[Tensor]]:
    """``prograd_backward``'s projected task gradients, returned (one per parameter, None for
    one that neither loss reaches) instead of added to ``.grad``: for a training step compiled
    as a whole, where the optimiser update takes the gradients directly."""
    params, lam = check_prograd_backward_args(task_loss, kl_loss, params, lam)
    if batched is None:
        batched = task_loss.device.type == "cuda"
    grads, ref_grads = (_batched_grads if batched else _two_pass_grads)(task_loss, kl_loss, params)
    # A parameter that only one loss reaches gets zeros for the other (as the official code's
    # cleared .grad).
    reached = []
    for i, (p, g, h) in enumerate(zip(params, grads, ref_grads)):
        if g is None and h is None:
            continue
        reached.append((i, torch.zeros_like(p) if g is None else g,
                        torch.zeros_like(p) if h is None else h))
    work = [g for _, g, _ in reached]
    project_pairs_(work, [h for _, _, h in reached], lam,
                   names=("task_loss: gradient of params", "kl_loss: gradient of params"),
                   indices=[i for i, *_ in reached])
    out: list[Optional[Tensor]] = [None] * len(params)
    for (i, _, _), g in zip(reached, work):
        out[i] = g
    return out
