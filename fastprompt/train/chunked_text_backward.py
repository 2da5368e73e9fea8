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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

import fastprompt


def check_text_chunk(text_chunk) -> int:
    """``text_chunk`` as an int >= 0 (0: the plain backward); ValueError naming it otherwise."""
    if isinstance(text_chunk, bool) or not isinstance(text_chunk, int) or text_chunk < 0:
        raise ValueError(f"text_chunk: expected classes per chunk, an int >= 0 (0: plain "
                         f"backward), got {text_chunk!r}")
    return text_chunk


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


def coop_encoding(prompted) -> TextEncoding:
    """``TextEncoding`` of a ``PromptedTextModel`` (CoOp, DSPT; shared or class-specific
    context)."""
    learner = prompted.prompt_learner

    def encode(ctx, a, b):
        rows = slice(a, b)
        return prompted.text_encoder(learner(ctx, classes=rows), learner.tokenized_prompts[rows])

    return TextEncoding(lambda: learner.ctx, encode, learner.n_cls, [learner.ctx])


def coop_chunked(prompted, chunk: int, autocast: Callable = contextlib.nullcontext
                 ) -> ChunkedTextBackward:
    """``ChunkedTextBackward`` for a ``PromptedTextModel``."""
    return ChunkedTextBackward(coop_encoding(prompted), chunk, autocast)


def softcpt_encoding(net, tasks: list[int]) -> tuple[TextEncoding, list[int]]:
    """``TextEncoding`` of a ``SoftCPTModel`` over the class prompts of ``tasks`` (their classes
    concatenated in that order), and each task's class count to split the features by. Prompts
    are padded to the longest of these tasks', as ``SoftCPTModel.forward`` pads them."""
    learners = [net.class_prompts[t] for t in tasks]
    sizes = [lr.n_cls for lr in learners]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    length = max(lr.prompt_length for lr in learners)

    def encode(ctx, a, b):
        embeds, tokens = [], []
        for i, lr in enumerate(learners):
            lo, hi = max(a, offsets[i]), min(b, offsets[i + 1])
            if lo >= hi:
                continue
            rows = slice(lo - offsets[i], hi - offsets[i])
            e, k = lr(ctx[i], classes=rows), lr.tokenized_prompts[rows]
            embeds.append(torch.nn.functional.pad(e, (0, 0, 0, length - e.shape[1])))
            tokens.append(torch.nn.functional.pad(k, (0, length - k.shape[1])))
        return net.text_encoder(torch.cat(embeds), torch.cat(tokens))

    return (TextEncoding(lambda: net.contexts(tasks), encode, offsets[-1],
                         net.trainable_parameters()), sizes)


def softcpt_chunked(net, tasks: list[int], chunk: int, autocast: Callable = contextlib.nullcontext
                    ) -> tuple[ChunkedTextBackward, list[int]]:
    """``ChunkedTextBackward`` for a ``SoftCPTModel`` over the class prompts of ``tasks``, and
    each task's class count (``softcpt_encoding``)."""
    encoding, sizes = softcpt_encoding(net, tasks)
    return ChunkedTextBackward(encoding, chunk, autocast), sizes
