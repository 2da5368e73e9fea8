"""The per-row statistics of the forward kernels' loss rows, as Triton device functions: the
target probabilities of each target kind, the running log-sum-exp, GCE's terms, and the
split-class passes' partial statistics with their exact merge (docs/kernels.md, "Classes split
for small N"; the math in docs/math.md).
"""
from __future__ import annotations

import triton
import triton.language as tl

TARGET_HARD, TARGET_UNIFORM, TARGET_TABLE = 0, 1, 2
# Per-row statistics of the split-class passes, each kept for every class range: sweep 1's
# (m, l, target_gap, target_seen, top, m_τ, l_τ, m⁰, l⁰, kl_gap), sweep 2's sums
# (Σ e^{p-1}, spread_q, spread_t, Σ t p), and GCE's soft-target sums: F (sweep 1 over softmax(z),
# sweep 2 under the double softmax), then E (over softmax(z)) or the spread of the target weights
# (double softmax).
NUM_PARTIALS = 16


@triton.jit
def targets(labels, table_base, cols, col_mask, smoothing, C, TARGET: tl.constexpr):
    """Target probabilities ``(1-ε) [c = y] + ε r_c`` (float32) at the class indices ``cols``,
    a 2-D index broadcast against the rows (a tile of columns, or one column per row)."""
    onehot = (cols == labels[:, None]).to(tl.float32)
    if TARGET == 0:
        target = onehot
    elif TARGET == 1:
        target = (1.0 - smoothing) * onehot + smoothing / C
    else:
        r = tl.load(table_base[:, None] + cols, mask=col_mask, other=0.0)
        target = (1.0 - smoothing) * onehot + smoothing * r
    return target


@triton.jit
def online_lse(m, l, z):
    """One tile of a running log-sum-exp: max ``m`` and ``l = Σ e^{z - m}`` per row."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    l = l * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
    return m_new, l


@triton.jit
def exp_expm1(x):
    """``(e^x, e^x - 1)`` for ``x <= 0`` (GCE's ``π^q`` and ``π^q - 1``), each to a few ulps
    relative: above -0.5 a degree-8 Taylor polynomial for ``e^x - 1`` (truncation below 2e-8
    relative), where ``exp(x) - 1`` would lose the low bits of a small x, and ``e^x`` from it
    (``>= 0.6``: nothing lost); below, ``exp(x)``, and ``exp(x) - 1`` (``|e^x - 1| > 0.39``)."""
    near = x * (1.0 + x * (0.5 + x * (1.0 / 6 + x * (1.0 / 24 + x * (
        1.0 / 120 + x * (1.0 / 720 + x * (1.0 / 5040 + x * (1.0 / 40320))))))))
    e = tl.exp(x)
    small = x > -0.5
    return tl.where(small, 1.0 + near, e), tl.where(small, near, e - 1.0)


@triton.jit
def expm1(x):
    """``e^x - 1`` for ``x <= 0`` (``exp_expm1``)."""
    _, em = exp_expm1(x)
    return em


@triton.jit
def gce_online_update(gce_f, gce_e, target_seen, shift, target, z, m_next, q):
    """One tile of ``F = Σ_c t_c (e^{q (z_c - m)} - 1)`` (<= 0) and ``E = Σ_c t_c e^{q (z_c -
    m)}`` (>= 0) relative to the running max ``m``. When the max grows by ``shift``, ``E`` is
    scaled by ``e^{-q shift}`` and each earlier term ``f`` of ``F`` becomes
    ``f + expm1(-q shift) (f + t_c)`` (``target_seen``: the earlier ``Σ t``), all terms <= 0.
    ``F`` (for the loss) keeps its accuracy where ``E`` is near 1, ``E`` (for the gradient) where
    it is small. ``target`` is 0 on masked columns, whose ``z`` may lie above ``m_next`` (hence
    the clamp)."""
    decay_e, decay_f = exp_expm1(-q * shift)
    terms_e, terms_f = exp_expm1(tl.minimum(q[:, None] * (z - m_next[:, None]), 0.0))
    gce_f = gce_f + decay_f * (gce_f + target_seen) + tl.sum(target * terms_f, axis=1)
    gce_e = gce_e * decay_e + tl.sum(target * terms_e, axis=1)
    return gce_f, gce_e


@triton.jit
def gce_loss(gce_f, gce_e, log_z, ce_loss, q):
    """GCE of rows with ``π_c = e^{w_c - M} / Z`` (``w = z`` or DSPT's ``p``, ``M`` their max or
    1, ``Z = Σ e^{w - M} >= 1``) from ``F = Σ_c t_c (e^{q (w_c - M)} - 1)``, ``E = Σ_c t_c
    e^{q (w_c - M)} = 1 + F`` and ``log Z``: with ``H = expm1(-q log Z)``, ``Σ_c t_c π_c^q =
    E (1 + H) = A`` and the loss ``Σ_c t_c (1 - π_c^q) / q = (-F - H E) / q``, non-negative
    terms; ``ce_loss`` where ``q = 0`` (the limit). Returns ``(loss, A, 1 + H)``, the last two
    each to a few ulps relative however small."""
    h1, h = exp_expm1(-q * log_z)
    loss = (-gce_f - h * gce_e) / tl.where(q > 0, q, 1.0)
    return tl.where(q > 0, loss, ce_loss), gce_e * h1, h1


@triton.jit
def partial_offsets(stat, rows, N, splits, split):
    """Where one partial statistic of the split-class passes lives: the float32 workspace is
    ``NUM_PARTIALS x splits x N``."""
    return (stat * splits + split).to(tl.int64) * N + rows


@triton.jit
def load_partial(partial_ptr, stat, rows, row_mask, N, splits, split):
    return tl.load(partial_ptr + partial_offsets(stat, rows, N, splits, split), mask=row_mask,
                   other=0.0)


@triton.jit
def merged_stats(partial_ptr, rows, row_mask, N, splits, q, DOUBLE_SOFTMAX: tl.constexpr,
                 HAS_KL: tl.constexpr, GCE_SWEEP_1: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sweep 1's statistics of whole rows from the ``splits`` partial ones (pass 1), merged
    exactly: log-sum-exps by their maxima, each gap sum shifted from its split's max to the
    row's (GCE_SWEEP_1: GCE's ``F`` with exponents ``q`` too); in split order, so every program
    merging a row gets the same bits.
    ``(m, l, target_gap, top, m_tau, l_tau, m0, l0, kl_gap, gce_f, gce_e)``."""
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    m_tau = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    m0 = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    top = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for split in range(0, splits):
        m_s = load_partial(partial_ptr, 0, rows, row_mask, N, splits, split)
        if DOUBLE_SOFTMAX:  # the first split holding the row's max, as one sweep picks it
            top_s = load_partial(partial_ptr, 4, rows, row_mask, N, splits, split)
            top_s = top_s.to(tl.int32, bitcast=True)
            top = tl.where(m_s > m, top_s, top)
        m = tl.maximum(m, m_s)
        if HAS_KL:
            m_tau_s = load_partial(partial_ptr, 5, rows, row_mask, N, splits, split)
            m_tau = tl.maximum(m_tau, m_tau_s)
            m0 = tl.maximum(m0, load_partial(partial_ptr, 7, rows, row_mask, N, splits, split))
    l = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_gap = tl.zeros((BLOCK_N,), dtype=tl.float32)
    l_tau = tl.zeros((BLOCK_N,), dtype=tl.float32)
    l0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    kl_gap = tl.zeros((BLOCK_N,), dtype=tl.float32)
    gce_f = tl.zeros((BLOCK_N,), dtype=tl.float32)
    gce_e = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for split in range(0, splits):
        m_s = load_partial(partial_ptr, 0, rows, row_mask, N, splits, split)
        l += load_partial(partial_ptr, 1, rows, row_mask, N, splits, split) * tl.exp(m_s - m)
        if not DOUBLE_SOFTMAX:
            # Σ_c t_c (m - z_c) = Σ_splits (gap_s + seen_s (m - m_s)): non-negative terms.
            gap_s = load_partial(partial_ptr, 2, rows, row_mask, N, splits, split)
            seen_s = load_partial(partial_ptr, 3, rows, row_mask, N, splits, split)
            target_gap += gap_s + seen_s * (m - m_s)
            if GCE_SWEEP_1:  # each term f_c + 1 scaled by e^{-q (m - m_s)}: all terms <= 0
                f_s = load_partial(partial_ptr, 14, rows, row_mask, N, splits, split)
                e_s = load_partial(partial_ptr, 15, rows, row_mask, N, splits, split)
                decay_e, decay_f = exp_expm1(-q * (m - m_s))
                gce_f += f_s + decay_f * (f_s + seen_s)
                gce_e += e_s * decay_e
        if HAS_KL:
            m_tau_s = load_partial(partial_ptr, 5, rows, row_mask, N, splits, split)
            l_tau_s = load_partial(partial_ptr, 6, rows, row_mask, N, splits, split)
            l_tau += l_tau_s * tl.exp(m_tau_s - m_tau)
            m0_s = load_partial(partial_ptr, 7, rows, row_mask, N, splits, split)
            l0_s = load_partial(partial_ptr, 8, rows, row_mask, N, splits, split)
            kl_gap_s = load_partial(partial_ptr, 9, rows, row_mask, N, splits, split)
            # Σ_c e^{z0_c/τ - m0} (m_τ - z_c/τ), from each split's sum around its own maxima.
            kl_gap += tl.exp(m0_s - m0) * (kl_gap_s + l0_s * (m_tau - m_tau_s))
            l0 += l0_s * tl.exp(m0_s - m0)
    # Rows past N (never stored) get sums of 1 rather than 0: no infinities downstream.
    l = tl.where(row_mask, l, 1.0)
    l_tau = tl.where(row_mask, l_tau, 1.0)
    l0 = tl.where(row_mask, l0, 1.0)
    return m, l, target_gap, top, m_tau, l_tau, m0, l0, kl_gap, gce_f, gce_e


@triton.jit
def summed_partial(partial_ptr, stat, rows, row_mask, N, splits, BLOCK_N: tl.constexpr):
    """A plain sum over the splits (in split order) of one partial statistic (1 past N)."""
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for split in range(0, splits):
        total += load_partial(partial_ptr, stat, rows, row_mask, N, splits, split)
    return tl.where(row_mask, total, 1.0)
