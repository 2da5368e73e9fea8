"""``fastprompt.project_conflicting_``: ProGrad's projection as one in-place torch op.

``fastprompt::project_conflicting_``: for every pair ``(g, h)``, ``g <- g - λ <g,h>/‖h‖² h`` where
``<g,h> < 0``, in place; one multi-tensor pass, the sign test on the device. With
``check_finite`` the kernel also refuses non-finite tensors (ValueError naming
``grads_name[indices[k]]``) before it writes anything: the C++ kernel from the sums of its own
reduction pass, the Triton path with one host synchronisation. Contract: docs/kernels.md.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastprompt import reference
from fastprompt._validation import (check_project_conflicting_args, finiteness_checks,
                                    run_value_checks, value_checks_wanted)
from fastprompt.ops._library import backend_for, define_op, triton_kernel

_project_kernel = triton_kernel("project_conflicting", "project_conflicting_")


def _check_finite(grads, ref_grads, grads_name, ref_grads_name, indices):
    run_value_checks(finiteness_checks(grads_name, grads, indices)
                     + finiteness_checks(ref_grads_name, ref_grads, indices))


def _project_triton(grads, ref_grads, lam, check_finite=False, grads_name="grads",
                    ref_grads_name="ref_grads", indices=None):
    if check_finite:
        _check_finite(grads, ref_grads, grads_name, ref_grads_name, indices)
    _project_kernel(grads, ref_grads, lam)
    # Written through raw pointers: bump the version counters as an in-place torch op would.
    torch.autograd.graph.increment_version([g for g in grads if g.numel() > 0])


def _project_fake(grads, ref_grads, lam, check_finite=False, grads_name="grads",
                  ref_grads_name="ref_grads", indices=None):
    return None


project_conflicting_op = define_op(
    "project_conflicting_(Tensor(a!)[] grads, Tensor[] ref_grads, float lam, "
    "bool check_finite=False, str grads_name=\"grads\", str ref_grads_name=\"ref_grads\", "
    "int[]? indices=None) -> ()",
    _project_fake, _project_triton)


def project_pairs_(grads: list[Tensor], ref_grads: list[Tensor], lam: float, *,
                   names: tuple[str, str] = ("grads", "ref_grads"),
                   indices: Optional[Sequence[int]] = None) -> None:
    """The projection of validated lists (``project_conflicting_`` and ``prograd_backward``),
    with the finiteness checks (messages ``names[0][indices[k]]``) left to the kernel."""
    indices = list(range(len(grads))) if indices is None else list(indices)
    kept = [(i, g, h) for i, g, h in zip(indices, grads, ref_grads) if g.numel() > 0]
    if not kept:
        return
    device = kept[0][1].device
    check = value_checks_wanted(kept[0][1])
    backend = backend_for(device)
    if backend == "reference":
        if check:
            _check_finite([g for _, g, _ in kept], [h for _, _, h in kept], names[0], names[1],
                          [i for i, _, _ in kept])
        reference.project_conflicting_unchecked_([g for _, g, _ in kept], [h for _, _, h in kept], lam)
        return
    # The kernels read flat contiguous memory; a strided gradient is projected in a copy.
    work = [g if g.is_contiguous() else g.contiguous() for _, g, _ in kept]
    refs = [h.contiguous() for _, _, h in kept]
    project_conflicting_op(work, refs, lam, check, names[0], names[1], [i for i, _, _ in kept])
    for (_, g, _), w in zip(kept, work):
        if w is not g:
            g.copy_(w)


def project_conflicting_(grads: list[Tensor], ref_grads: list[Tensor], lam: float = 1.0) -> None:
    """ProGrad's projection, in place: drop the part of each gradient that conflicts with its
    reference gradient.

    For every pair ``(g, h)`` on its own (one pair per parameter tensor, as the official code
    does it): if ``<g, h> < 0``, ``g <- g - lam * <g,h>/||h||² * h``; otherwise ``g`` is left as
    it is. A zero ``h`` leaves ``g`` unchanged. Reductions run in float32 (float64 for float64).

    Args:
        grads: tensors to project (the task loss's gradients), modified in place (their version
            counters are bumped, as any in-place op does). Refused: a tensor that requires grad
            while grad mode is on (the projection is not differentiable), and memory shared
            between any two tensors of both lists.
        ref_grads: the distillation loss's gradients, same shapes, dtypes and device.
        lam: λ >= 0, the fraction of the conflicting component removed (1 removes it all).

    On CUDA one Triton launch covers every tensor and the sign test never leaves the device; on
    CPU the C++ kernel runs. The finiteness check costs one host synchronisation on CUDA (none
    extra on CPU: the C++ kernel checks from its own sums); see docs/kernels.md for turning it off.
    """
    lam = check_project_conflicting_args(grads, ref_grads, lam)
    project_pairs_(list(grads), list(ref_grads), lam)
