"""The text side of a training step with the classes sharded over the ranks (docs/scaling.md).

The step's cost is the text encoder over all C class prompts; the image side is a batch of
cached features. So the ranks split the classes, not the samples: every rank takes the same
global batch, and rank r
1. encodes its contiguous slice of the C prompts (SoftCPT: of the classes of the batch's tasks),
   with grad (with ``--text-chunk K``: the exact two-pass backward over its slice, K at a time);
2. all-gathers the C x E text features without grad (slices padded to one size, then cut), and
   puts its own slice, with its graph, back in place;
3. computes the global loss with the fused op, identical on every rank, whose backward reaches
   only its own slice;
4. sums the trainable parameters' gradients over the ranks with one ``all_reduce`` of a flat
   buffer. ProGrad reduces the task and KL gradients (in the same buffer) before projecting,
   as the projection is not linear.
The gradients are the single process's up to float rounding, and every rank applies the same
update, so every rank holds the same parameters.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from fastprompt.train.text_backward import (AUTO, ChunkedTextBackward, TextEncoding,
                                                    apply_gradients, resolve_text_chunk)
from fastprompt.train.distributed import is_writer, world, world_size


def shard_bounds(num_classes: int, ranks: int) -> list[tuple[int, int]]:
    """Each rank's contiguous ``[start, stop)`` of ``num_classes`` classes: sizes differ by at
    most one, the first ``num_classes % ranks`` ranks take the larger (a rank may get none when
    there are fewer classes than ranks)."""
    base, extra = divmod(num_classes, ranks)
    bounds, start = [], 0
    for r in range(ranks):
        stop = start + base + (r < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


class ShardedText:
    """One step's class text features with the classes sharded over the default process group.

    ``features()`` returns all C x E features (this rank's slice with its graph, the others'
    without); build the loss from it, then call ``backward``. Under ``torch.no_grad`` it gives
    the features for evaluation (every rank must call it: it gathers).

    Args:
        encoding: the learner's ``TextEncoding``.
        chunk: K > 0: this rank's slice runs the exact two-pass backward K classes at a time
            (``ChunkedTextBackward``); 0: one pass with grad.
        autocast: () -> the context the text side runs in (the run's autocast).
    """

    def __init__(self, encoding: TextEncoding, chunk: int = 0,
                 autocast: Callable = contextlib.nullcontext):
        self.encoding, self.autocast = encoding, autocast
        self.params = list(encoding.params)
        self.rank, ranks = world()
        self.bounds = shard_bounds(encoding.num_classes, ranks)
        self.start, self.stop = self.bounds[self.rank]
        self.chunked = (ChunkedTextBackward(encoding.classes(self.start, self.stop), chunk,
                                            autocast)
                        if chunk and self.stop > self.start else None)
        self._local = None

    def _encode_slice(self) -> Tensor:
        if self.chunked is not None:
            return self.chunked.features()
        with self.autocast():
            src = self.encoding.source()
            if self.stop > self.start:
                return self.encoding.encode(src, self.start, self.stop)
            with torch.no_grad():  # no classes here: a 0 x E tensor of the features' dtype
                return self.encoding.encode(src.detach(), 0, 1)[:0]

    def features(self) -> Tensor:
        local = self._local = self._encode_slice()
        rows = max(stop - start for start, stop in self.bounds)
        sent = local.detach()
        if sent.shape[0] < rows:
            sent = torch.cat([sent, sent.new_zeros(rows - sent.shape[0], sent.shape[1])])
        parts = [torch.empty_like(sent) for _ in self.bounds]
        dist.all_gather(parts, sent.contiguous())
        pieces = [local if r == self.rank else part[:stop - start]
                  for r, (part, (start, stop)) in enumerate(zip(parts, self.bounds))]
        return torch.cat(pieces)

    def _local_gradients(self, losses: list[Tensor]) -> list[list[Tensor]]:
        """This rank's share of each loss's parameter gradients: through its slice only."""
        if self.stop == self.start:
            return [[torch.zeros_like(p) for p in self.params] for _ in losses]
        if self.chunked is not None:
            return self.chunked.parameter_gradients(losses)
        grads = [torch.autograd.grad(x, self.params, retain_graph=i + 1 < len(losses),
                                     allow_unused=True) for i, x in enumerate(losses)]
        return [[torch.zeros_like(p) if g is None else g for p, g in zip(self.params, gs)]
                for gs in grads]

    def backward(self, loss: Tensor, kl_loss: Tensor | None = None, lam: float = 1.0) -> None:
        """Accumulate the gradient of ``loss`` (with ``kl_loss``: ProGrad's projected gradient)
        into the parameters' ``.grad``, summed over the ranks: what one process's backward over
        all classes gives."""
        if self._local is None:
            raise RuntimeError("ShardedText.backward: call features() first")
        self._local = None
        losses = [loss] if kl_loss is None else [loss, kl_loss]
        grads = [g for gs in self._local_gradients(losses) for g in gs]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        summed = [part.view_as(g).to(g.dtype)
                  for part, g in zip(flat.split([g.numel() for g in grads]), grads)]
        n = len(self.params)
        apply_gradients(self.params, [summed[i:i + n] for i in range(0, len(summed), n)], lam)


def local_text_chunk(text_chunk: int | str, encoding: TextEncoding, device: torch.device,
                     autocast: Callable = contextlib.nullcontext) -> int:
    """``text_chunk`` for this rank (``"auto"``: chosen for the classes it encodes per step, its
    slice under several ranks, and its device's free memory; said on rank 0)."""
    if text_chunk != AUTO:
        return text_chunk
    rank, ranks = world()
    start, stop = shard_bounds(encoding.num_classes, ranks)[rank]
    if start == stop:
        return 0
    chunk = resolve_text_chunk(AUTO, encoding.classes(start, stop), device, autocast)
    if is_writer():
        print(f"fastprompt: --text-chunk auto: "
              f"{'K = %d classes per chunk' % chunk if chunk else 'the plain backward'} "
              f"for {stop - start} classes{' per rank' if ranks > 1 else ''} on {device}",
              file=sys.stderr)
    return chunk


def text_step(encoding: TextEncoding, chunk: int, autocast: Callable = contextlib.nullcontext):
    """The step's text side for a run: ``ShardedText`` under a process group of several ranks,
    ``ChunkedTextBackward`` for ``chunk`` K > 0 in one process, None for the plain one-pass
    backward (the caller runs the model and ``loss.backward()`` itself)."""
    if world_size() > 1:
        return ShardedText(encoding, chunk, autocast)
    if chunk:
        return ChunkedTextBackward(encoding, chunk, autocast)
    return None


@torch.no_grad()
def sharded_text_features(encoding: TextEncoding, autocast: Callable = contextlib.nullcontext
                          ) -> Tensor:
    """All C x E features for evaluation, each rank encoding its slice (every rank must call
    it)."""
    return ShardedText(encoding, 0, autocast).features()
