"""pytest-benchmark cases of ProGrad: the fused losses, ``prograd_backward`` and the multi-tensor
projection, each against the way the official ProGrad code does it.

    .venv/bin/python -m pytest bench --benchmark-only -p no:cacheprovider

Small sizes, so that the file runs in seconds; the full measurement (12-layer text transformer,
peak memory, result files) is ``bench/bench_prograd.py``. Not collected by the test suite.
"""
from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_prograd import PromptedTextEncoder, official_losses, official_projection  # noqa: E402

import fastprompt  # noqa: E402
from fastprompt import reference  # noqa: E402


def _features(n, c, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    t = torch.randn(c, d, generator=g).requires_grad_()
    t0 = torch.randn(c, d, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    return x, t, t0, labels, torch.tensor(100.0)


@pytest.mark.parametrize("provider", ["fused", "official"])
@pytest.mark.parametrize("double_softmax", [False, True], ids=["ce", "dspt"])
def test_losses_forward_backward(benchmark, double_softmax, provider):
    n, c, d = 256, 100, 512
    x, t, t0, labels, s = _features(n, c, d)
    losses = fastprompt.prograd_losses if provider == "fused" else official_losses

    def step():
        t.grad = None
        task, kl = losses(x, t, t0, labels, s, double_softmax=double_softmax)
        (task + kl).backward()
        return task, kl

    benchmark.group = f"prograd losses fwd+bwd {n}x{c}x{d} {'dspt' if double_softmax else 'ce'}"
    task, kl = benchmark.pedantic(step, warmup_rounds=1, rounds=15, iterations=1)
    want = official_losses(x, t.detach(), t0, labels, s, double_softmax=double_softmax)
    torch.testing.assert_close((task.detach(), kl.detach()), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backward", ["batched", "two_pass", "official"])
def test_prograd_backward(benchmark, backward):
    # A small prompted text transformer (1 layer, 8 prompts of 77 tokens): the same forward and
    # fused losses on every side, only the backward differs.
    encoder = PromptedTextEncoder(classes=8, layers=1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 512, generator=g)
    t0 = torch.randn(8, 512, generator=g)
    labels = torch.randint(0, 8, (16,), generator=g)
    s = torch.tensor(100.0)
    backward_fn = {"batched": functools.partial(fastprompt.prograd_backward, batched=True),
                   "two_pass": functools.partial(fastprompt.prograd_backward, batched=False),
                   "official": reference.prograd_backward}[backward]

    def step():
        encoder.ctx.grad = None
        task, kl = fastprompt.prograd_losses(x, encoder(), t0, labels, s)
        backward_fn(task, kl, [encoder.ctx])

    benchmark.group = "prograd_backward, 1-layer text transformer, 8 prompts"
    benchmark.pedantic(step, warmup_rounds=1, rounds=5, iterations=1)


@pytest.mark.parametrize("provider", ["fused", "official_loop"])
def test_projection(benchmark, provider):
    from open_clip.transformer import Transformer

    shapes = [p.shape for p in Transformer(512, 2, heads=8).parameters()]
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(shape, generator=g) for shape in shapes]
    refs = [torch.randn(shape, generator=g) for shape in shapes]
    lam = 0.5  # a conflicting pair stays conflicting: every round does the same work
    if provider == "fused":
        def step():
            fastprompt.project_conflicting_(grads, refs, lam)
    else:
        def step():
            official_projection(list(grads), refs, lam)

    benchmark.group = f"projection, {len(shapes)} tensors of a 2-layer transformer"
    benchmark.pedantic(step, warmup_rounds=1, rounds=15, iterations=1)
