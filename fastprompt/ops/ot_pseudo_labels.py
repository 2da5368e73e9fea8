"""``fastprompt.ot_pseudo_labels``: NLPrompt's optimal-transport pseudo-labels (Pan et al.,
``qunovo/NLPrompt: utils.py``), in plain torch on the tensors' device.

The entropic optimal transport between the N samples (uniform mass 1/N each) and the C classes
(uniform mass 1/C each) with cost ``-scores`` (N x C),

    π* = argmin_π <π, -scores> - reg · H(π)   s.t.   π 1 = 1/N,   πᵀ 1 = 1/C,

is solved by Sinkhorn's iterations, stabilised in the log domain (the official code calls POT's
``ot.sinkhorn``, whose kernel ``exp(scores / reg)`` underflows in float64 once ``reg`` is small
against the scores' spread, e.g. reg 0.001); each sample's pseudo-label is the class its row of
π* puts most mass on. The class marginal makes the labels balanced over the classes, which is
what lets them disagree with a noisy label that the prediction alone would follow.

NLPrompt's scores are ``log_softmax(softmax(z))`` of the current prompt's logits (its
``PMODE = 'logP'`` applied to the softmax probabilities): up to a per-row constant, which the row
marginal absorbs, they are the probabilities ``softmax(z)`` themselves.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fastprompt._validation import check_tensor


# Scaling iterations run in blocks of this many between checks (one host sync per block); a
# factor beyond exp(±ABSORB_LOG) is absorbed into the potentials and the kernel recomputed.
BLOCK = 10
ABSORB_LOG = 30.0


def _converged(column_marginal: Tensor, c: int, tol: float) -> bool:
    return float(torch.linalg.vector_norm(column_marginal - 1.0 / c)) < tol


@torch.no_grad()
def sinkhorn_log_coupling(scores: Tensor, reg: float, *, max_iters: int = 1000,
                          tol: float = 1e-6) -> Tensor:
    """``log π*`` (N x C, float64) of the transport above: alternate the dual potentials ``f``
    (rows) and ``g`` (classes) until the class marginal is within ``tol`` (L2, checked every
    10 iterations as POT checks it) or ``max_iters`` iterations have run.

    The iterations are the log-domain ones, evaluated the stabilised way: one log-domain update
    of ``g`` and ``f`` makes ``P = exp(log K + f + g)`` the current coupling (entries at most
    1/N, nothing overflows), then the same updates continue as scalings ``v = b / (Pᵀ u)``,
    ``u = a / (P v)`` (``f + log u``, ``g + log v`` are the log-domain potentials): two
    matrix-vector products per iteration instead of two log-sum-exps over N x C. When a factor
    leaves ``exp(±ABSORB_LOG)``, or a product underflows to 0 (a class whose every entry of P
    is below float64's range), the factors are absorbed into ``f`` and ``g`` and the next
    iteration is a log-domain one again, from the state of the last check."""
    n, c = scores.shape
    log_k = scores.double() / reg
    log_a, log_b = -math.log(n), -math.log(c)
    a, b = 1.0 / n, 1.0 / c
    f = torch.zeros(n, dtype=torch.float64, device=scores.device)
    g = torch.zeros(c, dtype=torch.float64, device=scores.device)
    it = 0
    while it < max_iters:
        # One log-domain iteration (exact at any reg).
        column = torch.logsumexp(log_k + f[:, None], dim=0)
        if it % BLOCK == 0 and it > 0 and _converged((g + column).exp(), c, tol):
            break
        g = log_b - column
        f = log_a - torch.logsumexp(log_k + g[None, :], dim=1)
        it += 1
        # Scaling iterations on the current coupling, checked every BLOCK iterations.
        p = (log_k + f[:, None] + g[None, :]).exp_()
        u = torch.ones(n, dtype=torch.float64, device=scores.device)
        v = torch.ones(c, dtype=torch.float64, device=scores.device)
        done = False
        while it < max_iters:
            saved = (u, v, it)
            column = p.T @ u
            if it % BLOCK == 0 and it > 0 and bool(torch.isfinite(v).all()) and _converged(
                    v * column, c, tol):  # the class marginal, before this iteration's update
                done = True
                break
            for step in range(min(BLOCK - it % BLOCK, max_iters - it)):
                if step:
                    column = p.T @ u
                v = b / column
                u = a / (p @ v)
                it += 1
            log_u, log_v = u.log(), v.log()
            if not bool(torch.isfinite(log_u).all() & torch.isfinite(log_v).all()):
                u, v, it = saved  # a product underflowed: absorb the last checked state
                break
            if bool((log_u.abs().max() > ABSORB_LOG) | (log_v.abs().max() > ABSORB_LOG)):
                break
        f, g = f + u.log(), g + v.log()
        del p
        if done:
            break
    return log_k + f[:, None] + g[None, :]


def ot_pseudo_labels(scores: Tensor, reg: float = 0.01, *, max_iters: int = 1000,
                     tol: float = 1e-6) -> Tensor:
    """Each row's class under the optimal transport of ``scores`` (N x C: higher is closer, e.g.
    log-probabilities) to uniform sample and class marginals with entropic regularisation
    ``reg`` (NLPrompt: 0.01 in its ``train.py``, 0.001 in its scripts): an int64 tensor of N
    labels on ``scores``' device. The coupling's argmax per row does not depend on the row's own
    constant, so log-probabilities and probabilities shifted per row give the same labels."""
    check_tensor("scores", scores, ndim=2, floating=True)
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores: expected N x C with N, C >= 1, got {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores: contains NaN or infinite values")
    if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not reg > 0 \
            or not math.isfinite(reg):
        raise ValueError(f"reg: expected a finite number > 0, got {reg!r}")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters: expected an int >= 1, got {max_iters!r}")
    return sinkhorn_log_coupling(scores, float(reg), max_iters=max_iters, tol=tol).argmax(1)
