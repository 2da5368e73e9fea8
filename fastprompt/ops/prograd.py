"""ProGrad (Zhu et al., "Prompt-aligned Gradient for Prompt Tuning") as torch custom ops.

* ``fastprompt::prograd_losses_forward`` -> ``(task_rows, kl_rows, grad_task_logits,
  grad_kl_logits)``: one fused pass gives the task loss (``clip_cross_entropy``'s, every target
  option and DSPT's double softmax), the distillation loss towards zero-shot CLIP
  ``-τ² Σ_c softmax(z⁰/τ)_c log softmax(z/τ)_c`` and both logit gradients. The zero-shot logits
  ``z⁰`` are recomputed from the zero-shot text features inside the pass, never stored; they are a
  fixed teacher, as in the official code (no gradient flows through them).
  Its autograd (``ProGradLossesFunction``) forms ``G = a_i Gtask + b_i Gkl`` from the upstream
  per-row gradients ``a``, ``b`` and reuses ``fastprompt::clip_cross_entropy_backward``.
* ``fastprompt::project_conflicting_``: for every pair ``(g, h)``, ``g <- g - λ <g,h>/‖h‖² h``
  where ``<g,h> < 0``, in place; one multi-tensor launch, the sign test on the device.

``prograd_backward`` gets both parameter gradients from one batched backward
(``is_grads_batched``) on CUDA, so the text encoder's graph is walked once, and from two backward
passes (``retain_graph``) on CPU, where the batched one measured slower (see its docstring).
Autograd vectorises the batched backward with vmap; the fused backward op gets a vmap rule here
that loops over the (tiny) batch of two.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from fastprompt import _backend, reference
from fastprompt._validation import (check_project_conflicting_args, check_prograd_backward_args,
                                    check_prograd_losses_args, finiteness_checks, run_value_checks)
from fastprompt.ops._library import define_op
from fastprompt.ops.clip_cross_entropy import (_resolve, clip_cross_entropy_backward,
                                               kernel_checks_values)

_EMPTY = (0,)


def _kernels(backend: str):
    if backend == "cpp":
        return (torch.ops.fastprompt_cpp.prograd_losses_forward,
                torch.ops.fastprompt_cpp.project_conflicting_)
    if backend == "triton":
        from fastprompt.kernels import prograd as k
        return k.prograd_losses_forward, k.project_conflicting_
    raise ValueError(f"backend: no fused kernel for {backend!r}")


def _losses_impl(image_features, text_features, zeroshot_text_features, labels, scale,
                 soft_labels, sample_index, smoothing, double_softmax, temperature, compute_grad,
                 backend):
    forward, _ = _kernels(backend)
    return forward(image_features, text_features, zeroshot_text_features, labels, scale,
                   soft_labels, sample_index, smoothing, double_softmax, temperature, compute_grad)


def _losses_fake(image_features, text_features, zeroshot_text_features, labels, scale,
                 soft_labels, sample_index, smoothing, double_softmax, temperature, compute_grad,
                 backend):
    n, c = image_features.shape[0], text_features.shape[0]
    task_rows = image_features.new_empty((n,), dtype=torch.float32)
    kl_rows = image_features.new_empty((n,), dtype=torch.float32)
    grad_shape = (n, c) if compute_grad else _EMPTY
    return task_rows, kl_rows, image_features.new_empty(grad_shape), image_features.new_empty(grad_shape)


prograd_losses_forward = define_op(
    "prograd_losses_forward(Tensor image_features, Tensor text_features, "
    "Tensor zeroshot_text_features, Tensor labels, Tensor scale, Tensor? soft_labels, "
    "Tensor? sample_index, float smoothing, bool double_softmax, float temperature, "
    "bool compute_grad, str backend) -> (Tensor, Tensor, Tensor, Tensor)",
    _losses_impl, _losses_fake)


class ProGradLossesFunction(torch.autograd.Function):
    """Autograd of ``fastprompt::prograd_losses_forward`` (an ``autograd.Function`` for the same
    reason as ``ClipCrossEntropyFunction``: ``register_autograd``'s wrapper costs more Python than
    the kernels take at training sizes). Its backward forms ``G = a_i Gtask + b_i Gkl`` and
    reuses ``fastprompt::clip_cross_entropy_backward``."""

    @staticmethod
    def forward(ctx, image_features, text_features, zeroshot_text_features, labels, scale,
                soft_labels, sample_index, smoothing, double_softmax, temperature, compute_grad,
                backend):
        outputs = prograd_losses_forward(
            image_features, text_features, zeroshot_text_features, labels, scale, soft_labels,
            sample_index, smoothing, double_softmax, temperature, compute_grad, backend)
        _, _, grad_task_logits, grad_kl_logits = outputs
        ctx.save_for_backward(image_features, text_features, scale, grad_task_logits, grad_kl_logits)
        ctx.backend = backend
        ctx.mark_non_differentiable(grad_task_logits, grad_kl_logits)
        # Unused outputs get None, not an N x C zero fill: the two logit-gradient outputs always,
        # and one of the losses in each of ProGrad's two backward passes.
        ctx.set_materialize_grads(False)
        return outputs

    @staticmethod
    def backward(ctx, grad_task_rows, grad_kl_rows, _unused_task, _unused_kl):
        if grad_task_rows is None and grad_kl_rows is None:
            return (None,) * 12
        image_features, text_features, scale, grad_task_logits, grad_kl_logits = ctx.saved_tensors
        if grad_task_logits.dim() != 2:
            raise RuntimeError("prograd_losses: backward called, but the forward ran without "
                               "gradients (inputs did not require grad when it ran)")
        need_x, need_t, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[4]
        if grad_kl_rows is None:  # only the task loss is differentiated: its buffer as it is
            upstream, grad_logits = grad_task_rows.float().contiguous(), grad_task_logits
        elif grad_task_rows is None:
            upstream, grad_logits = grad_kl_rows.float().contiguous(), grad_kl_logits
        else:
            # One N x C buffer for both losses, so the products run once. Not in place: the saved
            # gradients serve again when the graph is retained (the official two-backward
            # procedure).
            grad_logits = torch.addcmul(grad_task_logits * grad_task_rows.float()[:, None],
                                        grad_kl_logits, grad_kl_rows.float()[:, None])
            grad_logits = grad_logits.to(grad_task_logits.dtype)
            upstream = torch.ones_like(grad_task_rows, dtype=torch.float32)
        gx, gt, gs = clip_cross_entropy_backward(
            upstream, grad_logits, image_features, text_features, scale, True, need_x, need_t,
            need_s, ctx.backend)
        return (gx if need_x else None, gt if need_t else None, None, None, gs if need_s else None,
                None, None, None, None, None, None, None)


def _vmap_by_loop(op):
    """A vmap rule that runs ``op`` once per batch entry and stacks the outputs.

    For the small backward ops that ``is_grads_batched`` meets (the batch holds two); the text
    encoder's backward, where the time goes, is what gets batched.
    """
    def rule(info, in_dims, *args):
        outputs = []
        for b in range(info.batch_size):
            sliced = [a.select(d, b).contiguous() if d is not None else a
                      for a, d in zip(args, in_dims)]
            outputs.append(op(*sliced))
        stacked = tuple(torch.stack(parts) for parts in zip(*outputs))
        return stacked, (0,) * len(stacked)
    return rule


torch.library.register_vmap("fastprompt::clip_cross_entropy_backward",
                            _vmap_by_loop(clip_cross_entropy_backward))


def _project_impl(grads, ref_grads, lam, backend):
    _, project = _kernels(backend)
    project(grads, ref_grads, lam)


def _project_fake(grads, ref_grads, lam, backend):
    return None


project_conflicting_op = define_op(
    "project_conflicting_(Tensor(a!)[] grads, Tensor[] ref_grads, float lam, str backend) -> ()",
    _project_impl, _project_fake)


def prograd_losses(image_features: Tensor, text_features: Tensor, zeroshot_text_features: Tensor,
                   labels: Tensor, scale, *, temperature: float = 1.0, double_softmax: bool = False,
                   smoothing: float = 0.0, soft_labels: Optional[Tensor] = None,
                   sample_index: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """ProGrad's task loss and distillation loss towards zero-shot CLIP, fused.

    Args:
        image_features: N x D (cached image features; may require grad).
        text_features: C x D (the prompts' text features; may require grad).
        zeroshot_text_features: C x D, zero-shot CLIP's text features for the same classes
            (hand-written prompts such as "a photo of a {}."). A fixed teacher: no gradient flows
            through the zero-shot logits, to any input.
        labels: N int64 class indices in [0, C).
        scale: the logit multiplier (``logit_scale.exp()``), a float or a 0-d tensor; it scales
            both the prompt logits ``z`` and the zero-shot logits ``z⁰``.
        temperature: τ > 0 of the distillation loss.
        double_softmax, smoothing, soft_labels, sample_index: the task loss's options, exactly
            as in ``clip_cross_entropy``.

    Returns ``(task_loss, kl_loss)``, both float32 scalar means over the batch, with
    ``kl_loss = mean_i -τ² Σ_c softmax(z⁰_i/τ)_c log softmax(z_i/τ)_c``. Feed them to
    ``prograd_backward``. Runs the Triton kernel on CUDA and the C++ kernel on CPU
    (``FASTPROMPT_BACKEND`` forces one); float64 inputs are for ``fastprompt.reference``.
    """
    backend = _resolve(image_features)
    s, temperature = check_prograd_losses_args(
        image_features, text_features, zeroshot_text_features, labels, scale,
        temperature=temperature, smoothing=smoothing, soft_labels=soft_labels,
        sample_index=sample_index,
        kernel_checks_values=kernel_checks_values(backend, image_features))
    smoothing = float(smoothing)
    if backend == "reference":
        return reference.prograd_losses_unchecked(
            image_features, text_features, zeroshot_text_features, labels, s, temperature,
            double_softmax, smoothing, soft_labels, sample_index)
    if image_features.dtype == torch.float64:
        raise TypeError(f"image_features: float64 has no fused {backend} kernel; use float32, "
                        "bfloat16 or float16, or fastprompt.reference for float64 checks")
    if smoothing == 0.0:  # hard targets: the table plays no part
        soft_labels = sample_index = None
    if soft_labels is not None:
        soft_labels = soft_labels.float().contiguous()
    if sample_index is not None:
        sample_index = sample_index.contiguous()
    compute_grad = torch.is_grad_enabled() and (
        image_features.requires_grad or text_features.requires_grad or s.requires_grad)
    task_rows, kl_rows, _, _ = ProGradLossesFunction.apply(
        image_features.contiguous(), text_features.contiguous(),
        zeroshot_text_features.detach().contiguous(), labels.contiguous(), s, soft_labels,
        sample_index, smoothing, bool(double_softmax), temperature, compute_grad, backend)
    return task_rows.mean(), kl_rows.mean()


def _fused_value_checks(tensors: list) -> bool:
    """Whether the projection kernel checks finiteness itself: the C++ kernel does, from the sums
    of its own reduction pass (outside torch.compile, where the host-side raise is allowed)."""
    first = next((x for x in tensors if x is not None), None)
    return (first is not None and not torch.compiler.is_compiling()
            and _backend.resolve(first.device) == "cpp")


def _project_unchecked_(grads: list[Tensor], ref_grads: list[Tensor], lam: float,
                        check_names: Optional[tuple[str, str]] = None,
                        indices: Optional[list[int]] = None) -> None:
    """The projection. ``check_names``: the C++ kernel checks finiteness as it reduces, raising
    ValueError for ``check_names[0][indices[k]]`` / ``check_names[1][indices[k]]`` before
    anything is written (the caller left those checks to it: ``_fused_value_checks``)."""
    indices = list(range(len(grads))) if indices is None else list(indices)
    kept = [(i, g, h) for i, g, h in zip(indices, grads, ref_grads) if g.numel() > 0]
    if not kept:
        return
    backend = _backend.resolve(kept[0][1].device)
    if backend == "reference":
        reference.project_conflicting_unchecked_([g for _, g, _ in kept], [h for _, _, h in kept], lam)
        return
    # The kernels read flat contiguous memory; a strided gradient is projected in a copy.
    work = [g if g.is_contiguous() else g.contiguous() for _, g, _ in kept]
    refs = [h.contiguous() for _, _, h in kept]
    if check_names is not None and backend == "cpp":
        torch.ops.fastprompt_cpp.project_conflicting_checked_(
            work, refs, lam, [i for i, _, _ in kept], check_names[0], check_names[1])
    else:
        project_conflicting_op(work, refs, lam, backend)
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
        grads: tensors to project (the task loss's gradients), modified in place.
        ref_grads: the distillation loss's gradients, same shapes, dtypes and device.
        lam: λ >= 0, the fraction of the conflicting component removed (1 removes it all).

    On CUDA one Triton launch covers every tensor and the sign test never leaves the device; on
    CPU the C++ kernel runs. Validation (finite values) costs one host synchronisation, skipped
    under ``torch.compile``; the C++ kernel does it from the sums of its own reduction pass
    instead of a separate read of every gradient.
    """
    fused = isinstance(grads, (list, tuple)) and _fused_value_checks(
        [x for x in grads if isinstance(x, torch.Tensor)])
    lam = check_project_conflicting_args(grads, ref_grads, lam, values=not fused)
    _project_unchecked_(list(grads), list(ref_grads), lam,
                        check_names=("grads", "ref_grads") if fused else None)


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

    How ``g`` and ``h`` are obtained depends on the device, by measurement:

    * CPU: two ``autograd.grad`` passes (the first with ``retain_graph``). The alternative, one
      batched backward (``is_grads_batched``: autograd vmaps the backward over a batch of two grad
      outputs), measured slower on an open_clip text transformer (12 layers, width 512, 100
      prompts of 77 tokens, 2 CPU threads, ``bench/bench_prograd.py``,
      ``bench/results/prograd-cpu.md``): 20.7 s per step batched vs 19.4 s two-pass (21.7 s the
      official loop), 2199 vs 1958 MiB peak; an earlier run had it at 0.78x of the official
      two passes (68.6 vs 53.7 s). On CPU the batched matmuls gain nothing over two and the vmap
      adds copies and memory.
    * CUDA: the batched backward, one walk of the graph with twice-as-wide kernels, which is what
      the design calls for where kernel launches and small matmuls dominate. Not yet measured on
      a GPU here; ``bench/bench_prograd.py`` times both sides (``batched`` vs ``two_backward``).

    Args:
        task_loss, kl_loss: scalar losses sharing a graph (from ``prograd_losses``, or any two).
        params: the tensors to update (leaves requiring grad, e.g. the prompt context); each
            ``param.grad`` is added to as ``backward()`` would (set when it is None).
        lam: λ >= 0 of the projection.
        batched: force the batched backward (True) or the two passes (False); None picks per
            device as above.
    """
    params, lam = check_prograd_backward_args(task_loss, kl_loss, params, lam)
    if batched is None:
        batched = task_loss.device.type == "cuda"
    grads, ref_grads = (_batched_grads if batched else _two_pass_grads)(task_loss, kl_loss, params)
    names = ("task_loss: gradient of params", "kl_loss: gradient of params")
    fused = _fused_value_checks(params)
    if not fused:
        run_value_checks(finiteness_checks(names[0], grads) + finiteness_checks(names[1], ref_grads))
    # A parameter that neither loss reaches keeps its .grad, as backward() leaves it; one that
    # only one loss reaches gets zeros for the other (as the official code's cleared .grad).
    reached = []
    for i, (p, g, h) in enumerate(zip(params, grads, ref_grads)):
        if g is None and h is None:
            continue
        reached.append((i, p, torch.zeros_like(p) if g is None else g,
                        torch.zeros_like(p) if h is None else h))
    work = [g for _, _, g, _ in reached]
    _project_unchecked_(work, [h for _, _, _, h in reached], lam,
                        check_names=names if fused else None, indices=[i for i, *_ in reached])
    for (_, p, _, _), g in zip(reached, work):
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)
