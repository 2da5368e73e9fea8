"""An exact, low-memory text backward (the GradCache technique): the text encoder over all C class
prompts never holds more than K prompts' activations for backward.

The loss depends on the trainable parameters only through the class text features T (C x E). So:
1. the prompt context the text encoder consumes is computed with grad (cheap: CoOp's ``ctx``
   itself, SoftCPT's meta-network contexts) and cut off as a leaf ``src``;
2. T is encoded from ``src`` K classes at a time without grad and made a leaf requiring grad;
3. the caller computes the loss(es) from T with the fused ops;
4. ``backward`` takes ∂loss/∂T, re-encodes the classes K at a time with grad and backpropagates
   each chunk's slice of ∂loss/∂T into ``src``; then ``src``'s gradient into the parameters.
The gradients equal the plain backward's up to float rounding, at the price of one extra text
forward. ProGrad: the task loss's and the KL's gradients go through the chunks separately (the
projection is not linear) and are projected as ``fastprompt.prograd_backward`` does.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

import fastprompt


AUTO = "auto"
# Share of the free memory the automatic K lets the chunks' activations fill: the rest is for
# the backward's transient gradients, the optimiser and the allocator's fragmentation.
AUTO_MEMORY_FRACTION = 0.5


def check_text_chunk(text_chunk) -> int | str:
    """``text_chunk`` as an int >= 0 (0: the plain backward) or ``"auto"``; ValueError naming
    it otherwise."""
    if text_chunk == AUTO:
        return AUTO
    if isinstance(text_chunk, bool) or not isinstance(text_chunk, int) or text_chunk < 0:
        raise ValueError(f"text_chunk: expected classes per chunk, an int >= 0 (0: plain "
                         f"backward), or 'auto', got {text_chunk!r}")
    return text_chunk


def free_memory_bytes(device: torch.device) -> int:
    """Memory this process could still allocate on ``device``: CUDA's free memory plus what the
    caching allocator holds unused; on CPU the host's available memory (Linux ``MemAvailable``)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _saved_bytes(encoding: "TextEncoding", classes: int, autocast: Callable) -> int:
    """Bytes of the distinct storages autograd saves for backward in a forward over ``classes``
    class prompts."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        encoding.encode(encoding.source(), 0, classes)
    return sum(storages.values())


def activation_bytes_per_class(encoding: "TextEncoding",
                               autocast: Callable = contextlib.nullcontext) -> float:
    """What one class prompt adds to the activations the text side keeps for backward, from two
    small probe forwards (their difference cancels what does not grow with the classes: the
    context, weights saved by reference)."""
    large = min(encoding.num_classes, 4)
    if large == 1:
        return float(_saved_bytes(encoding, 1, autocast))
    return (_saved_bytes(encoding, large, autocast)
            - _saved_bytes(encoding, 1, autocast)) / (large - 1)


def choose_text_chunk(bytes_per_class: float, free_bytes: int, num_classes: int) -> int:
    """K for ``num_classes`` classes: 0 (the plain, faster backward) when all of their
    activations fit in ``AUTO_MEMORY_FRACTION`` of ``free_bytes``, else the most classes that
    fit, at least 1."""
    budget = AUTO_MEMORY_FRACTION * free_bytes
    if bytes_per_class * num_classes <= budget:
        return 0
    return max(1, min(num_classes, int(budget // max(bytes_per_class, 1.0))))


def resolve_text_chunk(text_chunk: int | str, encoding: "TextEncoding", device: torch.device,
                       autocast: Callable = contextlib.nullcontext,
                       num_classes: int | None = None) -> int:
    """``text_chunk``, with ``"auto"`` replaced by ``choose_text_chunk`` for this device's free
    memory and ``encoding``'s measured activations per class, over ``num_classes`` classes (the
    classes one step of this process encodes; default all of ``encoding``'s)."""
    if text_chunk != AUTO:
        return text_chunk
    per_class = activation_bytes_per_class(encoding, autocast)
    return choose_text_chunk(per_class, free_memory_bytes(device),
                             encoding.num_classes if num_classes is None else num_classes)


@dataclass(frozen=True)
class TextEncoding:
    """How a learner computes its C class text features, any range of classes at a time.

    Attributes:
        source: () -> the tensor the text encoder consumes that carries the trainable
            parameters' graph (e.g. the prompt context); computed once per step, with grad.
        encode: (src, start, stop) -> text features of classes [start, stop), from ``src``.
        num_classes: C, the rows of the text features.
        params: the trainable parameters ``src`` depends on.
    """
    source: Callable[[], Tensor]
    encode: Callable[[Tensor, int, int], Tensor]
    num_classes: int
    params: Sequence[Tensor]

    def classes(self, start: int, stop: int) -> "TextEncoding":
        """The same encoding restricted to classes [start, stop) (renumbered from 0)."""
        return replace(self, encode=lambda src, a, b: self.encode(src, start + a, start + b),
                       num_classes=stop - start)


def apply_gradients(params: Sequence[Tensor], grads: list[list[Tensor]], lam: float) -> None:
    """Accumulate the parameters' gradients of one loss (``grads[0]``) into their ``.grad``, or,
    given those of ProGrad's task loss and KL loss (``grads[0]``, ``grads[1]``), the projected
    task gradient exactly as ``fastprompt.prograd_backward`` computes it: through two linear
    surrogates whose gradients they are."""
    if len(grads) == 1:
        for p, g in zip(params, grads[0]):
            p.grad = g if p.grad is None else p.grad.add_(g)
        return
    task, kl = (sum((p * g).sum() for p, g in zip(params, gs)) for gs in grads)
    fastprompt.prograd_backward(task, kl, params, lam=lam)


def _dense(grads, params) -> list[Tensor]:
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


class ChunkedTextBackward:
    """One step's text side, chunked.

    Args:
        encoding: the learner's ``TextEncoding``.
        chunk: K >= 1, classes per chunk.
        autocast: () -> the context both text forwards run in (the run's autocast), so that the
            re-encoded chunks equal the first pass.
    """

    def __init__(self, encoding: TextEncoding, chunk: int,
                 autocast: Callable = contextlib.nullcontext):
        self.source, self._encode, self.autocast = encoding.source, encoding.encode, autocast
        self.num_classes, self.chunk = encoding.num_classes, chunk
        self.params = list(encoding.params)
        self._src = self._src_leaf = self._text = None

    def encode(self, src: Tensor, start: int, stop: int) -> Tensor:
        with self.autocast():
            return self._encode(src, start, stop)

    def _chunks(self):
        return [(a, min(a + self.chunk, self.num_classes))
                for a in range(0, self.num_classes, self.chunk)]

    def features(self) -> Tensor:
        """All C text features, computed chunk by chunk without grad, as a leaf requiring grad:
        build the loss from it, then call ``backward``."""
        with self.autocast():
            self._src = self.source()
        self._src_leaf = self._src.detach().requires_grad_(True)
        with torch.no_grad():
            text = torch.cat([self.encode(self._src_leaf, a, b) for a, b in self._chunks()])
        self._text = text.requires_grad_(True)
        return self._text

    def _source_gradients(self, text_grads: list[Tensor]) -> list[Tensor]:
        """Per text-feature gradient, the gradient it gives ``src``, one chunk's graph at a time."""
        totals = [torch.zeros_like(self._src_leaf) for _ in text_grads]
        for a, b in self._chunks():
            out = self.encode(self._src_leaf, a, b)
            for i, g in enumerate(text_grads):
                grad, = torch.autograd.grad(out, self._src_leaf, g[a:b],
                                            retain_graph=i + 1 < len(text_grads),
                                            allow_unused=True)
                if grad is not None:
                    totals[i] += grad
        return totals

    def parameter_gradients(self, losses: list[Tensor]) -> list[list[Tensor]]:
        """The parameters' gradients of each of ``losses`` (built from ``features()``), one list
        per loss, as ``torch.autograd.grad`` on the unchunked graph would give them (zeros for a
        parameter a loss does not reach)."""
        if self._text is None:
            raise RuntimeError("ChunkedTextBackward.backward: call features() first")
        text_grads = [torch.autograd.grad(x, self._text, retain_graph=i + 1 < len(losses))[0]
                      for i, x in enumerate(losses)]
        src_grads = self._source_gradients(text_grads)
        src, self._src = self._src, None
        self._src_leaf = self._text = None
        return [_dense(torch.autograd.grad(src, self.params, g, retain_graph=i + 1 < len(src_grads),
                                           allow_unused=True), self.params)
                for i, g in enumerate(src_grads)]

    def backward(self, loss: Tensor, kl_loss: Tensor | None = None, lam: float = 1.0) -> None:
        """Accumulate the gradient of ``loss`` into the parameters' ``.grad`` (with ``kl_loss``:
        ProGrad's projected gradient), as ``loss.backward()`` / ``fastprompt.prograd_backward``
        on the unchunked graph would."""
        losses = [loss] if kl_loss is None else [loss, kl_loss]
        apply_gradients(self.params, self.parameter_gradients(losses), lam)
