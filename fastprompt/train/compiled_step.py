"""A CoOp-style training step compiled as one graph (``fastprompt train --compile``).

At small batches a step is a few microseconds of device work behind a fraction of a millisecond
of Python (module calls, autograd, the optimiser's loop), so on a GPU the per-step overhead
decides throughput. ``CompiledStep`` hands ``torch.compile(fullgraph=True)`` the whole step:
prompt learner, truncated text encoder, fused loss op, backward (ProGrad: both gradients and the
projection) and the SGD update. On CUDA it compiles with ``mode="reduce-overhead"``, so each
step replays a CUDA graph; on CPU with inductor's default mode.

What would break the graph or a CUDA graph's capture stays outside the step:

* the data: each batch is gathered from the cache and moved to the device before the call;
* the learning rate: a 0-d device tensor filled once per epoch, so the schedule never recompiles;
* metrics: the loss sums accumulate in device tensors, read once per epoch;
* randomness: the epoch's order and views are drawn per epoch, outside;
* value checks: the fused ops skip them under ``torch.compile`` (the cache was checked when
  built; a bad value gives a NaN loss, which stops the run at the epoch's end).

``torch.optim.SGD.step`` always breaks the graph (it toggles grad mode around the update), so
the step applies SGD's update itself, with the optimiser's hyper-parameters and in its
``momentum_buffer`` state: checkpoints are the eager loop's, and a run trained with
``--compile`` resumes without it and the reverse. Gradients come from ``torch.autograd.grad``
(traced with dynamo's ``trace_autograd_ops``), so ``.grad`` is never touched.

Compiled and eager steps agree to float32 rounding, not bitwise: inductor fuses and reorders
the reductions of the text encoder and the update.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastprompt.ops.prograd_backward import projected_task_grads
from fastprompt.train.config import TrainConfig
from fastprompt.train.epoch import autocast, epoch_batches, epoch_result, set_epoch_lr
from fastprompt.train.objective import fused_losses, with_batch_soft_labels

# torch.compile's backend. Tests of the graph capture set "aot_eager": the same dynamo graph and
# AOT autograd, without inductor's minute of C++ compilation per graph on a small CPU.
BACKEND = "inductor"


# Graphs kept for the step's code: up to four per configuration (see CompiledStep), and a
# process may train several configurations (a sweep, the demo); torch's default is 8.
RECOMPILE_LIMIT = 64


def compile_mode(device: torch.device) -> str:
    """``torch.compile``'s mode for a step on ``device``: CUDA graphs on CUDA, inductor's default
    elsewhere (CUDA graphs need a GPU)."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def check_sgd(optimizer: torch.optim.Optimizer) -> dict:
    """The hyper-parameters of ``optimizer``, a plain ``torch.optim.SGD`` (the update the
    compiled step applies itself); anything else is refused."""
    if type(optimizer) is not torch.optim.SGD:
        raise ValueError(f"compile: the compiled step applies SGD's update; got "
                         f"{type(optimizer).__name__}")
    if len(optimizer.param_groups) != 1:
        raise ValueError("compile: the compiled step takes one parameter group")
    group = optimizer.param_groups[0]
    unsupported = [k for k in ("nesterov", "maximize", "differentiable") if group.get(k)]
    if group.get("dampening", 0) != 0:
        unsupported.append("dampening")
    if unsupported:
        raise ValueError(f"compile: SGD with {', '.join(unsupported)} is not supported")
    return {"momentum": float(group["momentum"]), "weight_decay": float(group["weight_decay"])}


def sgd_update_(params: list[Tensor], grads: list[Tensor | None], buffers: list[Tensor],
                lr: Tensor, momentum: float, weight_decay: float) -> None:
    """``torch.optim.SGD``'s update (no dampening or Nesterov) with the learning rate as a
    tensor. The momentum buffers start at zero, which gives SGD's first step (buffer = the
    first gradient) exactly; a parameter without gradient is left alone, as SGD does."""
    for p, g, buf in zip(params, grads, buffers):
        if g is None:
            continue
        d = g.add(p, alpha=weight_decay) if weight_decay else g
        if momentum:
            buf.mul_(momentum).add_(d)
            d = buf
        p.sub_(d * lr)


class CompiledStep:
    """The training step of a prompt whose C class text features ``text_features()`` computes
    from ``params`` (a CoOp-style prompt: ``PromptedTextModel.__call__``), with ``optimizer``
    (SGD over ``params``) and an optional learner's own loss term ``extra_loss(text)``, compiled
    on first use; ``run_epoch`` replaces ``fastprompt.train.epoch.optimise_epoch`` for one epoch.

    One graph per batch size (a short last batch is a second) and target kind (ATLaS's hard and
    soft epochs): at most four, however many epochs; learning rates never recompile.
    """

    def __init__(self, text_features, params: list[Tensor], optimizer: torch.optim.Optimizer,
                 config: TrainConfig, zeroshot: Tensor | None, device: torch.device,
                 extra_loss=None):
        self.text_features, self.optimizer, self.config = text_features, optimizer, config
        self.zeroshot, self.device, self.extra_loss = zeroshot, device, extra_loss
        if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
            raise ValueError(f"compile: torch {torch.__version__} cannot trace the backward into "
                             "the step's graph (no dynamo trace_autograd_ops); upgrade torch or "
                             "train without --compile")
        self.params = list(params)
        self.hyper = check_sgd(optimizer)
        self.mode = compile_mode(device)
        # Read and written by the compiled step at fixed addresses (CUDA graphs replay on them).
        self.lr = torch.zeros((), device=device)
        self.total = torch.zeros((), device=device)
        self.total_kl = torch.zeros((), device=device)
        self.scale = torch.zeros((), device=device)
        self.buffers = [torch.zeros_like(p) for p in self.params]
        for t in (self.lr, self.total, self.total_kl, self.scale, *self.buffers):
            torch._dynamo.mark_static_address(t)
        self.options: dict = {}
        options = {"mode": self.mode} if BACKEND == "inductor" else {}
        self._compiled = torch.compile(self._step, fullgraph=True, dynamic=False, backend=BACKEND,
                                       **options)

    def _step(self, images: Tensor, labels: Tensor, targets_rows: Tensor | None) -> None:
        options = with_batch_soft_labels(self.options, targets_rows)
        with autocast(self.device, self.config.amp):
            text = self.text_features()
        loss, kl = fused_losses(images, text, labels, self.scale, self.config, options,
                                self.zeroshot)
        extra = self.extra_loss(text) if self.extra_loss is not None else None
        if extra is not None:
            loss = loss + extra
        if kl is None:
            grads = list(torch.autograd.grad(loss, self.params))
        else:
            # Two passes: in one graph, the batched backward saves no launches.
            grads = projected_task_grads(loss, kl, self.params, self.config.lam, batched=False)
        with torch.no_grad():
            sgd_update_(self.params, grads, self.buffers, self.lr, self.hyper["momentum"],
                        self.hyper["weight_decay"])
            n = images.shape[0]
            self.total.add_(loss.detach().float() * n)
            if kl is not None:
                self.total_kl.add_(kl.detach().float() * n)

    def _adopt_momentum_buffers(self) -> None:
        """Make the optimiser's ``momentum_buffer`` state the step's own buffers (copying what a
        loaded checkpoint or an eager epoch left there), so that both see one state."""
        if not self.hyper["momentum"]:
            return
        with torch.no_grad():
            for p, buf in zip(self.params, self.buffers):
                state = self.optimizer.state[p]
                current = state.get("momentum_buffer")
                if current is buf:
                    continue
                if current is None:
                    buf.zero_()
                else:
                    buf.copy_(current)
                state["momentum_buffer"] = buf

    def run_epoch(self, epoch: int, num_rows: int, batch_inputs, scale: Tensor, options: dict,
                  bar=None) -> dict:
        """One epoch of compiled steps: ``batch_inputs(start, stop)`` gives a batch's
        ``(images, labels, instance-wise target rows or None)`` on the device, ``options`` the loss's
        options for the epoch. Returns what ``optimise_epoch`` returns."""
        lr = set_epoch_lr(self.config, self.optimizer, epoch)
        self._adopt_momentum_buffers()
        with torch.no_grad():
            self.lr.fill_(lr)
            self.scale.copy_(scale)
            self.total.zero_()
            self.total_kl.zero_()
        self.options = options
        with torch._dynamo.config.patch(trace_autograd_ops=True, recompile_limit=RECOMPILE_LIMIT):
            for start, stop in epoch_batches(num_rows, self.config.batch_size):
                self._compiled(*batch_inputs(start, stop))
                if bar is not None:
                    bar.update(stop - start)
        return epoch_result(self.config, epoch, lr, num_rows, self.total, self.total_kl)
