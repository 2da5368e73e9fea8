"""pytest-benchmark cases of ``fastprompt.clip_cross_entropy``: the fused backend against the eager
plain-torch reference, forward+backward with frozen image features (as in training).

    .venv/bin/python -m pytest bench --benchmark-only -p no:cacheprovider

A few small shapes, so that the whole file runs in seconds; the full grid with torch.compile,
peak memory and the result files is ``bench/bench_clip_cross_entropy.py``. Cases are grouped by
shape and loss, so pytest-benchmark's table puts the two providers side by side. Not collected
by the test suite (``testpaths`` is ``tests/``, and ``--benchmark-skip`` is the default).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_clip_cross_entropy import make_case  # noqa: E402

import fastprompt  # noqa: E402
from fastprompt import reference  # noqa: E402

SHAPES = [(256, 100, 512), (256, 1000, 512)]


def _loss(provider, double_softmax):
    if provider == "fused":
        return lambda x, t, y, s: fastprompt.clip_cross_entropy(x, t, y, s, double_softmax=double_softmax)
    return lambda x, t, y, s: reference.clip_cross_entropy_unchecked(
        x, t, y, s, double_softmax, 0.0, None, None, True, "mean")


@pytest.mark.parametrize("provider", ["fused", "reference"])
@pytest.mark.parametrize("double_softmax", [False, True], ids=["ce", "dspt"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward(benchmark, shape, double_softmax, provider):
    n, c, d = shape
    x, t, y, s = make_case(n, c, d, torch.float32, torch.device("cpu"))
    loss_fn = _loss(provider, double_softmax)

    def step():
        t.grad = None
        loss = loss_fn(x, t, y, s)
        loss.backward()
        return loss

    benchmark.group = f"clip_cross_entropy fwd+bwd {n}x{c}x{d} {'dspt' if double_softmax else 'ce'}"
    benchmark.extra_info.update(n=n, c=c, d=d, threads=torch.get_num_threads())
    loss = benchmark.pedantic(step, warmup_rounds=1, rounds=15, iterations=1)
    # Both providers compute the same thing: a cheap guard against timing a broken kernel.
    want = _loss("reference", double_softmax)(x, t.detach(), y, s)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("provider", ["fused", "reference"])
@pytest.mark.parametrize("double_softmax", [False, True], ids=["ce", "dspt"])
def test_forward_no_grad(benchmark, double_softmax, provider):
    n, c, d = 256, 1000, 512
    x, t, y, s = make_case(n, c, d, torch.float32, torch.device("cpu"))
    loss_fn = _loss(provider, double_softmax)

    def step():
        with torch.no_grad():
            return loss_fn(x, t, y, s)

    benchmark.group = f"clip_cross_entropy forward {n}x{c}x{d} {'dspt' if double_softmax else 'ce'}"
    benchmark.pedantic(step, warmup_rounds=1, rounds=15, iterations=1)
