"""NLPrompt's optimal-transport pseudo-labels against POT's ``ot.sinkhorn`` (what the official
code calls), on random scores shaped as NLPrompt's: ``log_softmax(softmax(s · cos))``."""
import math

import numpy as np
import pytest
import torch

import fastprompt
from fastprompt.ops.ot_pseudo_labels import sinkhorn_log_coupling

ot = pytest.importorskip("ot")


def nlprompt_scores(g, n, c, scale=30.0):
    x = torch.nn.functional.normalize(torch.randn(n, 16, generator=g, dtype=torch.float64), dim=1)
    t = torch.nn.functional.normalize(torch.randn(c, 16, generator=g, dtype=torch.float64), dim=1)
    return torch.log_softmax(torch.softmax(scale * x @ t.T, dim=1), dim=1)


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")  # POT's own, at 1000 iterations
@pytest.mark.parametrize("n, c, reg", [(160, 10, 0.01), (97, 13, 0.05), (400, 37, 0.02)])
def test_labels_agree_with_pot(seed, n, c, reg):
    g = torch.Generator().manual_seed(seed)
    scores = nlprompt_scores(g, n, c)
    ours = fastprompt.ot_pseudo_labels(scores, reg=reg)
    a, b = np.full(n, 1.0 / n), np.full(c, 1.0 / c)
    pot = ot.sinkhorn(a, b, -scores.numpy(), reg, numItermax=1000, stopThr=1e-6).argmax(1)
    assert (ours.numpy() == pot).mean() >= 0.99


def test_the_coupling_has_the_marginals(seed):
    g = torch.Generator().manual_seed(seed)
    scores = nlprompt_scores(g, 50, 7)
    pi = sinkhorn_log_coupling(scores, 0.01, max_iters=2000, tol=1e-9).exp()
    torch.testing.assert_close(pi.sum(0), torch.full((7,), 1 / 7, dtype=torch.float64),
                               atol=1e-8, rtol=0)
    torch.testing.assert_close(pi.sum(1), torch.full((50,), 1 / 50, dtype=torch.float64),
                               atol=1e-10, rtol=0)


def test_balanced_labels_and_row_constants(seed):
    """The class marginal spreads the labels over the classes even where one class wins every
    row's prediction; a constant added to a row changes nothing. The marginal binds the coupling,
    not its row-wise argmax, so the counts are near N / C rather than equal to it."""
    g = torch.Generator().manual_seed(seed)
    scores = nlprompt_scores(g, 60, 3)
    scores[:, 0] += 1.5  # more than the scores' spread: class 0 is every row's most probable one
    assert (scores.argmax(1) == 0).all()
    labels = fastprompt.ot_pseudo_labels(scores, reg=0.01)
    counts = torch.bincount(labels, minlength=3)
    assert ((counts - 20).abs() <= 8).all(), counts
    shifted = scores + torch.randn(60, 1, generator=g, dtype=torch.float64)
    assert torch.equal(fastprompt.ot_pseudo_labels(shifted, reg=0.01), labels)


def test_small_reg_stays_finite_where_the_plain_kernel_underflows(seed):
    g = torch.Generator().manual_seed(seed)
    scores = nlprompt_scores(g, 80, 5) * 50  # spread 50: exp(-M/0.001) is 0 in float64
    labels = fastprompt.ot_pseudo_labels(scores, reg=0.001)
    assert labels.shape == (80,) and labels.max() < 5


@pytest.mark.parametrize("kwargs, match", [
    (dict(scores=torch.zeros(0, 3)), "scores: expected N x C"),
    (dict(scores=torch.tensor([[0.0, float("nan")]])), "scores: contains NaN"),
    (dict(scores=torch.zeros(2, 3), reg=0), "reg: expected a finite number > 0"),
    (dict(scores=torch.zeros(2, 3), max_iters=0), "max_iters: expected an int >= 1"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastprompt.ot_pseudo_labels(**kwargs)


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
def test_the_official_scripts_reg_agrees_with_pots_log_domain_solver(seed):
    """At reg 0.001 (NLPrompt's scripts) POT's plain kernel underflows; its log-domain solver
    does not, and gives the same labels."""
    g = torch.Generator().manual_seed(seed)
    scores = nlprompt_scores(g, 160, 10)
    ours = fastprompt.ot_pseudo_labels(scores, reg=0.001)
    a, b = np.full(160, 1.0 / 160), np.full(10, 1.0 / 10)
    pot = ot.sinkhorn(a, b, -scores.numpy(), 0.001, method="sinkhorn_log", numItermax=1000,
                      stopThr=1e-6).argmax(1)
    assert (ours.numpy() == pot).mean() >= 0.99


def log_domain_coupling(scores, reg, max_iters=1000, tol=1e-6):
    """Sinkhorn's iterations as log-sum-exps of the dual potentials, the class marginal checked
    every 10 iterations: what the stabilised scalings must reproduce."""
    n, c = scores.shape
    log_k = scores.double() / reg
    f, g = torch.zeros(n, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    for it in range(max_iters):
        column = torch.logsumexp(log_k + f[:, None], dim=0)
        if it % 10 == 0 and it > 0 and torch.linalg.vector_norm((g + column).exp() - 1 / c) < tol:
            break
        g = -math.log(c) - column
        f = -math.log(n) - torch.logsumexp(log_k + g[None, :], dim=1)
    return log_k + f[:, None] + g[None, :]


@pytest.mark.parametrize("n, c, reg, spread, max_iters", [
    (160, 10, 0.01, 1.0, 1000), (301, 29, 0.001, 1.0, 1000),  # absorbs as the factors grow
    (83, 7, 0.001, 50.0, 1000),  # columns of the kernel underflow: back to the log domain
    (64, 9, 0.001, 1.0, 37),     # stops mid-block at max_iters
])
def test_stabilised_iterations_are_the_log_domain_ones(seed, n, c, reg, spread, max_iters):
    g = torch.Generator().manual_seed(seed)
    scores = nlprompt_scores(g, n, c) * spread
    want = log_domain_coupling(scores, reg, max_iters)
    got = sinkhorn_log_coupling(scores, reg, max_iters=max_iters)
    assert torch.equal(got.argmax(1), want.argmax(1))
    mass = want.exp() > 1e-12  # where the coupling holds any mass, log π agrees closely
    torch.testing.assert_close(got[mass], want[mass], rtol=0, atol=1e-8)
