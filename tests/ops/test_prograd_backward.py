"""prograd_backward against the official two-backward procedure on a small text transformer,
and its bad input."""
from __future__ import annotations

import functools

import pytest
import torch
from open_clip.transformer import Transformer

import fastprompt
from fastprompt import reference
from testlib import assert_close_to_truth, backend, make_prograd_inputs  # noqa: F401 (fixture)


# --- prograd_backward against the official two-backward procedure -----------------------------------

class TinyTextEncoder(torch.nn.Module):
    """A CoOp-style text tower: learned context tokens spliced into fixed embeddings, open_clip's
    causal Transformer, pooling at the end-of-text position, a projection."""

    def __init__(self, classes=5, length=9, width=32, n_ctx=3, dim=16, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.transformer = Transformer(width, layers=2, heads=4)
        self.ln_final = torch.nn.LayerNorm(width)
        self.text_projection = torch.nn.Parameter(torch.randn(width, dim, generator=gen) / width**0.5)
        self.ctx = torch.nn.Parameter(0.3 * torch.randn(n_ctx, width, generator=gen))
        self.register_buffer("embeddings", torch.randn(classes, length, width, generator=gen))
        self.register_buffer("eot", torch.randint(n_ctx + 2, length, (classes,), generator=gen))
        self.register_buffer("attn_mask", torch.full((length, length), float("-inf")).triu_(1))
        self.n_ctx = n_ctx

    def forward(self):
        e = self.embeddings
        x = torch.cat([e[:, :1], self.ctx.expand(e.shape[0], -1, -1), e[:, 1 + self.n_ctx:]], dim=1)
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        return x[torch.arange(x.shape[0]), self.eot] @ self.text_projection


def _prograd_step(losses_fn, backward_fn, encoder, x, t0, labels, s, kw, lam, task_fn=None,
                  kl_sign=1.0):
    encoder.zero_grad(set_to_none=False)
    params = [encoder.ctx, encoder.text_projection, encoder.ln_final.weight]
    for p in params:  # a gradient from an earlier step, to be accumulated into
        p.grad = torch.full_like(p, 0.01)
    text = encoder()
    task, kl = losses_fn(x, text, t0, labels, s, temperature=1.5, double_softmax=True, **kw)
    if task_fn is not None:
        task = task_fn(x, text, labels, s, double_softmax=True, **kw)
    backward_fn(task, kl_sign * kl, params, lam=lam)
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("batched", [None, True, False], ids=["per-device", "batched", "two-pass"])
@pytest.mark.parametrize("lam", [1.0, 0.6])
def test_prograd_backward_equals_two_backward_passes(backend, lam, batched, seed):
    name, device = backend
    encoder = TinyTextEncoder(seed=seed).to(device)
    x, _, _, labels, s, kw = make_prograd_inputs(6, 5, 16, target="classwise", seed=seed, device=device)
    t0 = torch.randn(5, 16, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    # With the distillation loss and with its negative, every parameter's pair conflicts in
    # exactly one of the two runs: both branches of the projection are exercised.
    ours_backward = functools.partial(fastprompt.prograd_backward, batched=batched)
    for kl_sign in (1.0, -1.0):
        ours = _prograd_step(fastprompt.prograd_losses, ours_backward, encoder, x, t0,
                             labels, s, kw, lam, kl_sign=kl_sign)
        official = _prograd_step(reference.prograd_losses, reference.prograd_backward, encoder, x,
                                 t0, labels, s, kw, lam, kl_sign=kl_sign)
        for i, (a, b) in enumerate(zip(ours, official)):
            assert_close_to_truth(a, b, 1e-4, 1e-5, f"params[{i}].grad (kl sign {kl_sign})")


def test_prograd_backward_with_clip_cross_entropy_task(backend, seed):
    # The task loss from clip_cross_entropy: its backward op runs under the batched backward too.
    name, device = backend
    encoder = TinyTextEncoder(seed=seed).to(device)
    x, _, _, labels, s, kw = make_prograd_inputs(7, 5, 16, target="uniform", seed=seed, device=device)
    t0 = torch.randn(5, 16, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    ours = _prograd_step(fastprompt.prograd_losses, fastprompt.prograd_backward, encoder, x, t0,
                         labels, s, kw, 1.0, task_fn=fastprompt.clip_cross_entropy)
    official = _prograd_step(reference.prograd_losses, reference.prograd_backward, encoder, x, t0,
                             labels, s, kw, 1.0, task_fn=reference.clip_cross_entropy)
    for i, (a, b) in enumerate(zip(ours, official)):
        assert_close_to_truth(a, b, 1e-4, 1e-5, f"params[{i}].grad")


def test_reference_prograd_backward_projects_hand_computed_case():
    # One parameter w, losses linear in it: g = ∇task = a, h = ∇kl = b with <a, b> < 0.
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    b = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    ours = [functools.partial(fastprompt.prograd_backward, batched=b) for b in (True, False)]
    for backward_fn in (reference.prograd_backward, *ours):
        w.grad = None
        backward_fn((w * a).sum(), (w * b).sum(), [w])
        # a - <a,b>/|b|² b = a + b/2
        torch.testing.assert_close(w.grad, torch.tensor([0.5, 2.0, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "two-pass"])
def test_prograd_backward_partly_reached_params(batched):
    # u is reached by the task loss only, through an expanded (stride-0) gradient; v by the
    # distillation loss only; r by neither (its .grad stays as it was). As the official code:
    # the missing gradient counts as zeros, so u gets g and v gets nothing added.
    u = torch.zeros(4, requires_grad=True)
    v = torch.zeros(3, requires_grad=True)
    r = torch.zeros(2, requires_grad=True)
    r.grad = torch.full((2,), 7.0)
    v.grad = torch.ones(3)
    task, kl = 2 * u.sum(), (v * torch.arange(3.0)).sum()
    fastprompt.prograd_backward(task, kl, [u, v, r], batched=batched)
    torch.testing.assert_close(u.grad, torch.full((4,), 2.0))
    torch.testing.assert_close(v.grad, torch.ones(3))
    torch.testing.assert_close(r.grad, torch.full((2,), 7.0))


# --- bad input ------------------------------------------------------------------------------------

def test_bad_prograd_backward_input_names_the_argument(backend):
    w = torch.randn(4, requires_grad=True)
    frozen = torch.randn(4)
    cases = [
        ("lam", ValueError, lambda: ((w * 2).sum(), (w * 3).sum(), [w]), {"lam": -1.0}),
        ("params", ValueError, lambda: ((w * 2).sum(), (w * 3).sum(), []), {}),
        ("params", ValueError, lambda: ((w * 2).sum(), (w * 3).sum(), [w, frozen]), {}),
        ("task_loss", ValueError, lambda: (w * 2, (w * 3).sum(), [w]), {}),
        ("kl_loss", ValueError, lambda: ((w * 2).sum(), (frozen * 3).sum(), [w]), {}),
        # One batched backward sends a zero through the other loss's branch too, and 0 * inf is
        # NaN: either loss may be named for a non-finite gradient.
        ("(task_loss|kl_loss)", ValueError, lambda: ((w * float("nan")).sum(), (w * 3).sum(), [w]), {}),
        ("(task_loss|kl_loss)", ValueError, lambda: ((w * 2).sum(), (w * float("inf")).sum(), [w]), {}),
    ]
    for arg, exc, make, kw in cases:
        for fn in (fastprompt.prograd_backward, reference.prograd_backward):
            w.grad = None
            with pytest.raises(exc, match=f"^{arg}"):
                fn(*make(), **kw)


