"""Triton kernel of both forward ops, ``fastprompt::clip_cross_entropy_forward`` and
``fastprompt::prograd_losses_forward``: one kernel, ProGrad's distillation term switched on by a
constexpr (the CUDA path; under ``TRITON_INTERPRET=1`` it also runs on CPU tensors, which is how
CI tests it).

Each program owns ``BLOCK_N`` rows and sweeps the classes in ``BLOCK_C`` tiles: all of them
(large N), or for small N one range of them, the ranges' row statistics then merged through a
small float32 workspace by the later passes of the same kernel. The logits are recomputed from
the features in every sweep rather than stored: a bf16 logit buffer would cost precision exactly
where the softmax is sensitive. The normalisation is folded in as per-row and per-column
factors, so no normalised copy exists. The logit gradients are written into rows padded to 16
elements. The task loss is cross-entropy or, with the GCE constexpr, GCE/MAE with one exponent or
one per row, whose sums ride in the same sweeps (``row_statistics.py``). The same kernel is the
row pass of the cuBLAS schedule and of the logits ops (stored products, ``PRODUCTS_STORED``).
Sweeps, passes and why: docs/kernels.md.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastprompt.kernels.launch import (INTERPRET, SM_COUNT, dot_precision, mma,
                                        next_pow2_between, on_input_device)
from fastprompt.kernels.logit_gradient_layout import logit_gradient_buffer, padded_columns
from fastprompt.kernels.row_statistics import (NUM_PARTIALS, TARGET_HARD, TARGET_TABLE,
                                               TARGET_UNIFORM, exp_expm1, expm1, gce_loss,
                                               gce_online_update, merged_stats, online_lse,
                                               partial_offsets, summed_partial, targets)
from fastprompt.kernels.row_norms import row_inv_norms, scaled_rows

# Each program of the split-class passes sweeps at least this many class tiles: its fixed work
# (the row set-up, merging every range's statistics) stays small next to its sweeps.
MIN_C_TILES_PER_SPLIT = 4


def forward_config(n: int, c: int, d: int, dtype: torch.dtype, two_products: bool) -> dict:
    """Block sizes and launch options of the forward kernel, and ``C_SPLITS``, the number of
    class ranges each row block is split into (``class_splits``); deterministic, no
    autotuning."""
    if INTERPRET:  # interpreter cost grows with programs x iterations: few, large blocks
        blocks = dict(BLOCK_N=next_pow2_between(n, 16, 64), BLOCK_C=next_pow2_between(c, 16, 128),
                      BLOCK_D=next_pow2_between(d, 16, 128))
    else:
        # GPU (not yet timed on a device): the largest tiles that compile without register
        # spills for sm_80 and sm_90 (tests/kernels/test_compile_for_gpu.py): 64 x 32 on 8
        # warps, 64 x 16 with ProGrad's second accumulator; the D step is one 128-byte row of
        # half (64) or float32 (32) elements. Small batches get narrower row blocks so that more
        # programs run.
        block_n = 64 if n >= 4096 else (32 if n >= 512 else 16)
        block_c = next_pow2_between(c, 16, 16 if two_products else 32)
        block_d = next_pow2_between(d, 16, 32 if dtype == torch.float32 else 64)
        blocks = dict(BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=8,
                      num_stages=3)
    return dict(blocks, C_SPLITS=class_splits(n, c, blocks["BLOCK_N"], blocks["BLOCK_C"]))


def class_splits(n: int, c: int, block_n: int, block_c: int) -> int:
    """Class ranges per row block: as many as fill ``SM_COUNT`` programs with the row blocks
    (``SM_COUNT // row blocks``, so 1 from about 66 row blocks on: large N keeps one program per
    row block), each of at least ``MIN_C_TILES_PER_SPLIT`` tiles. N=256, C=1000: 16 row blocks
    x 8 ranges of 4 tiles of 32 classes."""
    row_blocks = triton.cdiv(n, block_n)
    return max(1, min(SM_COUNT // row_blocks, triton.cdiv(c, block_c) // MIN_C_TILES_PER_SPLIT))


@triton.jit
def _logit_tiles(x_ptr, t_ptr, t0_ptr, xt_ptr, xt0_ptr, rows, row_mask, cols, col_mask, C, D,
                 row_coef, col_coef, col_coef0, HAS_T0: tl.constexpr,
                 PRODUCTS_STORED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_D: tl.constexpr, CAST_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """``z = row_coef_i col_coef_c (x_i · t_c)`` on one tile, and ``z⁰`` from ``t0`` sharing the
    same loads of ``x`` when HAS_T0 (otherwise the second result is a copy of the first).
    PRODUCTS_STORED: the products ``x_i · t_c`` (and ``x_i · t0_c``) are read from the
    row-major buffers ``xt`` and ``xt0`` (rows x C; float32, or the half-precision logits of the
    logits ops, converted as they are loaded) instead of computed."""
    if PRODUCTS_STORED:
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        mask = row_mask[:, None] & col_mask[None, :]
        acc = tl.load(xt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc0 = acc
        if HAS_T0:
            acc0 = tl.load(xt0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        acc0 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        x_base = x_ptr + rows.to(tl.int64)[:, None] * D
        t_offs = cols.to(tl.int64)[None, :] * D
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_mask = dd < D
            x = tl.load(x_base + dd[None, :], mask=row_mask[:, None] & d_mask[None, :],
                        other=0.0)
            t_mask = d_mask[:, None] & col_mask[None, :]
            t = tl.load(t_ptr + t_offs + dd[:, None], mask=t_mask, other=0.0)  # BLOCK_D x BLOCK_C
            acc = mma(x, t, acc, CAST_FP32, PRECISION)
            if HAS_T0:
                t0 = tl.load(t0_ptr + t_offs + dd[:, None], mask=t_mask, other=0.0)
                acc0 = mma(x, t0, acc0, CAST_FP32, PRECISION)
    z = acc * row_coef[:, None] * col_coef[None, :]
    if HAS_T0:
        z0 = acc0 * row_coef[:, None] * col_coef0[None, :]
    else:
        z0 = z
    return z, z0


@triton.jit
def _col_coef(inv_norm_ptr, cols, col_mask, NORMALIZE: tl.constexpr, BLOCK_C: tl.constexpr):
    if NORMALIZE:
        coef = tl.load(inv_norm_ptr + cols, mask=col_mask, other=0.0)
    else:
        coef = tl.full((BLOCK_C,), 1.0, dtype=tl.float32)
    return coef


@triton.jit
def clip_loss_forward_kernel(
        x_ptr, t_ptr, t0_ptr, x_inv_norm_ptr, t_inv_norm_ptr, t0_inv_norm_ptr, scale_ptr,
        labels_ptr, table_row_ptr, table_ptr,
        loss_ptr, kl_ptr, grad_ptr, grad_kl_ptr,
        N, C, D, R, smoothing, temperature, grad_stride, c_store,
        TARGET: tl.constexpr, DOUBLE_SOFTMAX: tl.constexpr, NORMALIZE: tl.constexpr,
        HAS_KL: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
        CAST_FP32: tl.constexpr, PRECISION: tl.constexpr,
        xt_ptr=None, xt0_ptr=None, PRODUCTS_STORED: tl.constexpr = False,
        partial_ptr=None, c_per_split=0, splits=1, PASS: tl.constexpr = 0,
        SCALED: tl.constexpr = True, GCE: tl.constexpr = False, Q_PER_ROW: tl.constexpr = False,
        q=0.0, q_ptr=None):
    # PRODUCTS_STORED: the row pass of the cuBLAS schedule (clip_loss_cublas.py), the same sweeps
    # over products a matmul stored; the factors turn them into logits as they do x_i · t_c.
    # grad_stride: the row stride of the gradient outputs; c_store: the columns their stores
    # cover (C, or the padded row, whose columns past C get zeros: whole-tile vector stores).
    # PASS 0: each program sweeps every class of its BLOCK_N rows. PASS 1-3 split the classes
    # into `splits` ranges of `c_per_split` (program_id(1)), for small N (docs/kernels.md):
    # 1 writes each range's sweep-1 statistics to the float32 workspace at partial_ptr; 2 (double
    # softmax) merges them and writes each range's sweep-2 sums; 3 merges everything, writes the
    # losses (split 0) and its range's gradient.
    # SCALED=False: the scale is 1 (the logits ops, whose stored products are the logits).
    # GCE: the task loss is GCE with exponent q (Q_PER_ROW: one per row at q_ptr; rows with
    # q = 0 get cross-entropy): the same sweeps with GCE's sums added (docs/math.md).
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    split = tl.program_id(1)
    if PASS == 0:
        c_begin = 0
        c_end = C
    else:
        c_begin = split * c_per_split
        c_end = tl.minimum(C, c_begin + c_per_split)
    # Index loads are clamped so that unchecked bad labels can never address outside the tables;
    # the rows they belong to get NaN task losses and gradients (validation off: docs/kernels.md).
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    index_ok = (labels >= 0) & (labels < C)
    labels = tl.minimum(tl.maximum(labels, 0), C - 1)
    if TARGET == 2:
        table_rows = tl.load(table_row_ptr + rows, mask=row_mask, other=0)
        index_ok = index_ok & (table_rows >= 0) & (table_rows < R)
        table_rows = tl.minimum(tl.maximum(table_rows, 0), R - 1)
        table_base = table_ptr + table_rows.to(tl.int64) * C
    else:
        table_base = table_ptr
    if SCALED:
        s = tl.load(scale_ptr).to(tl.float32)
    else:
        s = 1.0
    if GCE:
        if Q_PER_ROW:
            q_row = tl.load(q_ptr + rows, mask=row_mask, other=0.0)
        else:
            q_row = tl.zeros((BLOCK_N,), dtype=tl.float32) + q
    if NORMALIZE:
        row_coef = s * tl.load(x_inv_norm_ptr + rows, mask=row_mask, other=0.0)
    else:
        row_coef = tl.zeros((BLOCK_N,), dtype=tl.float32) + s
    inv_temperature = 1.0 / temperature

    if PASS <= 1:
        # Sweep 1: lse(z) (running max m, l = Σ e^{z-m}); with the KL term also lse(z/τ) and
        # lse(z⁰/τ). The losses are accumulated as sums of non-negative terms, so that a small
        # loss (a well-fit row at scale 100) is not the difference of two O(100) numbers:
        #   cross-entropy  lse(z) - Σ t z            = log l + Σ_c t_c (m - z_c)
        #   KL term        -τ² Σ P0 log softmax(z/τ) = τ² (log l_τ + Σ_c P0_c (m_τ - z_c/τ))
        # with each sum shifted whenever its running max grows.
        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((BLOCK_N,), dtype=tl.float32)
        target_gap = tl.zeros((BLOCK_N,), dtype=tl.float32)
        target_seen = tl.zeros((BLOCK_N,), dtype=tl.float32)
        m_tau = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        l_tau = tl.zeros((BLOCK_N,), dtype=tl.float32)
        m0 = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        l0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        kl_gap = tl.zeros((BLOCK_N,), dtype=tl.float32)
        gce_f = tl.zeros((BLOCK_N,), dtype=tl.float32)  # GCE, soft targets: Σ t (e^{q(z-m)} - 1)
        gce_e = tl.zeros((BLOCK_N,), dtype=tl.float32)  # and Σ t e^{q(z-m)}
        top = tl.zeros((BLOCK_N,), dtype=tl.int32)  # a column where z is largest (double softmax)
        for c0 in range(c_begin, c_end, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_mask = cols < c_end
            z, z0 = _logit_tiles(
                x_ptr, t_ptr, t0_ptr, xt_ptr, xt0_ptr, rows, row_mask, cols, col_mask, C, D,
                row_coef, _col_coef(t_inv_norm_ptr, cols, col_mask, NORMALIZE, BLOCK_C),
                _col_coef(t0_inv_norm_ptr, cols, col_mask, NORMALIZE, BLOCK_C),
                HAS_KL, PRODUCTS_STORED, BLOCK_N, BLOCK_C, BLOCK_D, CAST_FP32, PRECISION)
            z_in = tl.where(col_mask[None, :], z, 0.0)
            z_lse = tl.where(col_mask[None, :], z, float("-inf"))
            if DOUBLE_SOFTMAX:
                top = tl.where(tl.max(z_lse, axis=1) > m, tl.argmax(z_lse, axis=1) + c0, top)
            else:
                target = targets(labels, table_base, cols[None, :], col_mask[None, :],
                                 smoothing, C, TARGET)
                target = tl.where(col_mask[None, :], target, 0.0)
                m_next = tl.maximum(m, tl.max(z_lse, axis=1))
                shift = tl.where(target_seen > 0, m_next - m, 0.0)
                if GCE:
                    if TARGET != 0:
                        gce_f, gce_e = gce_online_update(gce_f, gce_e, target_seen, shift,
                                                         target, z_in, m_next, q_row)
                target_gap += (shift * target_seen
                               + tl.sum(target * (m_next[:, None] - z_in), axis=1))
                target_seen += tl.sum(target, axis=1)
            m, l = online_lse(m, l, z_lse)
            if HAS_KL:
                z_tau = tl.where(col_mask[None, :], z * inv_temperature, float("-inf"))
                z0_tau = tl.where(col_mask[None, :], z0 * inv_temperature, float("-inf"))
                m_tau_next = tl.maximum(m_tau, tl.max(z_tau, axis=1))
                m0_next = tl.maximum(m0, tl.max(z0_tau, axis=1))
                alpha = tl.exp(m0 - m0_next)
                e0 = tl.exp(z0_tau - m0_next[:, None])
                shift = tl.where(l0 > 0, m_tau_next - m_tau, 0.0)
                kl_gap = ((kl_gap + shift * l0) * alpha
                          + tl.sum(e0 * (m_tau_next[:, None] - z_in * inv_temperature), axis=1))
                l0 = l0 * alpha + tl.sum(e0, axis=1)
                m0 = m0_next
                m_tau, l_tau = online_lse(m_tau, l_tau, z_tau)
        if PASS == 1:
            at = partial_ptr + partial_offsets(0, rows, N, splits, split)
            step = N * splits  # from one statistic to the next (splits > 1 only for small N)
            tl.store(at, m, mask=row_mask)
            tl.store(at + step, l, mask=row_mask)
            tl.store(at + 2 * step, target_gap, mask=row_mask)
            tl.store(at + 3 * step, target_seen, mask=row_mask)
            tl.store(at + 4 * step, top.to(tl.float32, bitcast=True), mask=row_mask)
            tl.store(at + 5 * step, m_tau, mask=row_mask)
            tl.store(at + 6 * step, l_tau, mask=row_mask)
            tl.store(at + 7 * step, m0, mask=row_mask)
            tl.store(at + 8 * step, l0, mask=row_mask)
            tl.store(at + 9 * step, kl_gap, mask=row_mask)
            if GCE:
                tl.store(at + 14 * step, gce_f, mask=row_mask)
                tl.store(at + 15 * step, gce_e, mask=row_mask)
    else:
        if GCE:
            q_merge = q_row
        else:
            q_merge = tl.zeros((BLOCK_N,), dtype=tl.float32)
        m, l, target_gap, top, m_tau, l_tau, m0, l0, kl_gap, gce_f, gce_e = merged_stats(
            partial_ptr, rows, row_mask, N, splits, q_merge, DOUBLE_SOFTMAX, HAS_KL,
            GCE and not DOUBLE_SOFTMAX and TARGET != 0, BLOCK_N)

    if PASS != 1:
        # softmax as e^{z - m} / l rather than e^{z - lse}: z - m is exact near the top, while
        # lse (up to ~100) carries an absolute rounding error of ~1e-5 into every probability.
        inv_l = 1.0 / l
        if DOUBLE_SOFTMAX:
            # Sweep 2: p = softmax(z) lies in [0, 1], so a fixed shift of 1 replaces the running
            # max (e^{p-1} in [1/e, 1]; exact 0 loss for C = 1), and the sums of the class
            # ranges simply add. The gradient
            #   ∂loss/∂z_c = p_c (q_c - t_c - Σ_k p_k (q_k - t_k)),   q = e^{p-1} / Σ e^{p-1},
            # is tiny where p is nearly one-hot (DSPT's suppressed samples), and summing Σ p q
            # and Σ p t separately would leave only rounding of 1. With j = argmax p
            # (p_j = 1/l) and Σ p = 1 it is rewritten without cancellation as
            #   p_c ((e^{p_c-1} - e^{p_j-1} + Σ_k p_k (e^{p_j-1} - e^{p_k-1})) / Σ e^{p-1}
            #        - (t_c - t_j + Σ_k p_k (t_j - t_k))).
            exp_p_top = tl.exp(inv_l - 1.0)
            target_top = tl.sum(targets(labels, table_base, top[:, None], top[:, None] < C,
                                        smoothing, C, TARGET), axis=1)
            if GCE:
                # GCE's target weights a_c = t_c e^{q (p_c - 1)} at the arg-max column, and
                # their spread Σ_k p_k (a_top - a_k), the counterpart of spread_t.
                a_top = target_top * (1.0 + expm1(q_row * (inv_l - 1.0)))
                gce_f = tl.zeros((BLOCK_N,), dtype=tl.float32)
                spread_a = tl.zeros((BLOCK_N,), dtype=tl.float32)
            if PASS == 0 or PASS == 2:
                sum_exp_p = tl.zeros((BLOCK_N,), dtype=tl.float32)
                spread_q = tl.zeros((BLOCK_N,), dtype=tl.float32)
                spread_t = tl.zeros((BLOCK_N,), dtype=tl.float32)
                target_dot_p = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for c0 in range(c_begin, c_end, BLOCK_C):
                    cols = c0 + tl.arange(0, BLOCK_C)
                    col_mask = cols < c_end
                    z, _ = _logit_tiles(
                        x_ptr, t_ptr, t0_ptr, xt_ptr, xt0_ptr, rows, row_mask, cols, col_mask, C,
                        D, row_coef,
                        _col_coef(t_inv_norm_ptr, cols, col_mask, NORMALIZE, BLOCK_C),
                        _col_coef(t_inv_norm_ptr, cols, col_mask, NORMALIZE, BLOCK_C),
                        False, PRODUCTS_STORED, BLOCK_N, BLOCK_C, BLOCK_D, CAST_FP32, PRECISION)
                    p = tl.where(col_mask[None, :], tl.exp(z - m[:, None]) * inv_l[:, None], 0.0)
                    exp_p = tl.where(col_mask[None, :], tl.exp(p - 1.0), 0.0)
                    sum_exp_p += tl.sum(exp_p, axis=1)
                    spread_q += tl.sum(p * (exp_p_top[:, None] - exp_p), axis=1)
                    target = targets(labels, table_base, cols[None, :], col_mask[None, :],
                                      smoothing, C, TARGET)
                    spread_t += tl.sum(p * (target_top[:, None] - target), axis=1)
                    target_dot_p += tl.sum(target * p, axis=1)
                    if GCE:
                        if TARGET != 0:
                            em = expm1(q_row[:, None] * (p - 1.0))
                            gce_f += tl.sum(tl.where(col_mask[None, :], target * em, 0.0),
                                            axis=1)
                            spread_a += tl.sum(p * (a_top[:, None] - target * (1.0 + em)),
                                               axis=1)
                if PASS == 2:
                    at = partial_ptr + partial_offsets(10, rows, N, splits, split)
                    step = N * splits
                    tl.store(at, sum_exp_p, mask=row_mask)
                    tl.store(at + step, spread_q, mask=row_mask)
                    tl.store(at + 2 * step, spread_t, mask=row_mask)
                    tl.store(at + 3 * step, target_dot_p, mask=row_mask)
                    if GCE:
                        if TARGET != 0:
                            tl.store(at + 4 * step, gce_f, mask=row_mask)
                            tl.store(at + 5 * step, spread_a, mask=row_mask)
            else:
                sum_exp_p = summed_partial(partial_ptr, 10, rows, row_mask, N, splits, BLOCK_N)
                spread_q = summed_partial(partial_ptr, 11, rows, row_mask, N, splits, BLOCK_N)
                spread_t = summed_partial(partial_ptr, 12, rows, row_mask, N, splits, BLOCK_N)
                target_dot_p = summed_partial(partial_ptr, 13, rows, row_mask, N, splits,
                                              BLOCK_N)
                if GCE:
                    if TARGET != 0:
                        gce_f = summed_partial(partial_ptr, 14, rows, row_mask, N, splits,
                                               BLOCK_N)
                        spread_a = summed_partial(partial_ptr, 15, rows, row_mask, N, splits,
                                                  BLOCK_N)
            loss = tl.log(sum_exp_p) + (1.0 - target_dot_p)
            inv_sum_exp_p = 1.0 / sum_exp_p
            if GCE:
                if TARGET == 0:  # a hard label: one term, p_y = Σ t p
                    gce_f = expm1(q_row * (target_dot_p - 1.0))
                    spread_a = a_top - target_dot_p * (1.0 + gce_f)
                # Each e^{q (p - 1)} lies in [e^{-1}, 1]: E = 1 + F loses nothing.
                loss, a_sum, h1 = gce_loss(gce_f, 1.0 + gce_f, tl.log(sum_exp_p), loss, q_row)
        else:
            loss = tl.log(l) + target_gap
            if GCE:
                if TARGET == 0:  # a hard label: one term, z_y - m = -target_gap
                    gce_e, gce_f = exp_expm1(-q_row * target_gap)
                loss, a_sum, h1 = gce_loss(gce_f, gce_e, tl.log(l), loss, q_row)

    if PASS == 0 or PASS == 3:
        bad_index = tl.where(index_ok, 0.0, float("nan"))
        first = row_mask & (split == 0)  # the losses: once per row
        tl.store(loss_ptr + rows, loss + bad_index, mask=first)
        if HAS_KL:
            kl = temperature * temperature * (tl.log(l_tau) + kl_gap / l0)
            tl.store(kl_ptr + rows, kl, mask=first)
            inv_l_tau = 1.0 / l_tau
            inv_l0 = 1.0 / l0

        if COMPUTE_GRAD:
            # Sweep 3: recompute the tile, write ∂loss_i/∂z (and τ (softmax(z/τ) -
            # softmax(z⁰/τ))); columns from C to c_store get zeros.
            out_offs = rows.to(tl.int64)[:, None] * grad_stride
            for c0 in range(c_begin, c_end, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                col_mask = cols < c_end
                z, z0 = _logit_tiles(
                    x_ptr, t_ptr, t0_ptr, xt_ptr, xt0_ptr, rows, row_mask, cols, col_mask, C, D,
                    row_coef,
                    _col_coef(t_inv_norm_ptr, cols, col_mask, NORMALIZE, BLOCK_C),
                    _col_coef(t0_inv_norm_ptr, cols, col_mask, NORMALIZE, BLOCK_C),
                    HAS_KL, PRODUCTS_STORED, BLOCK_N, BLOCK_C, BLOCK_D, CAST_FP32, PRECISION)
                target = targets(labels, table_base, cols[None, :], col_mask[None, :],
                                 smoothing, C, TARGET)
                # Padding columns get p = 0 (their z = 0 may lie far above m and overflow
                # e^{p-1}).
                p = tl.where(col_mask[None, :], tl.exp(z - m[:, None]) * inv_l[:, None], 0.0)
                if DOUBLE_SOFTMAX:
                    dq = ((tl.exp(p - 1.0) - exp_p_top[:, None] + spread_q[:, None])
                          * inv_sum_exp_p[:, None])
                    if GCE:
                        # ∂ℓ/∂p = π A - a, through the first softmax as above (docs/math.md).
                        if TARGET == 0:
                            ta = target * (1.0 + gce_f)[:, None]
                        else:
                            ta = target * (1.0 + expm1(q_row[:, None] * (p - 1.0)))
                        da = ta - a_top[:, None] + spread_a[:, None]
                        grad = p * (a_sum[:, None] * dq - h1[:, None] * da)
                    else:
                        dt = target - target_top[:, None] + spread_t[:, None]
                        grad = p * (dq - dt)
                elif GCE:
                    # π A - t π^q: A (p - t) for a hard label.
                    if TARGET == 0:
                        grad = a_sum[:, None] * (p - target)
                    else:
                        e_q = tl.exp(tl.minimum(q_row[:, None] * (z - m[:, None]), 0.0))
                        grad = p * a_sum[:, None] - target * e_q * h1[:, None]
                else:
                    grad = p - target
                grad = tl.where(col_mask[None, :], grad + bad_index[:, None], 0.0)
                # Bounds that are multiples of 16 (c_store, the ranges' ends) keep the stores
                # vectorised.
                store_cols = cols < c_store
                if PASS != 0:
                    store_cols = store_cols & (cols < c_begin + c_per_split)
                out_mask = row_mask[:, None] & store_cols[None, :]
                tl.store(grad_ptr + out_offs + cols[None, :], grad.to(grad_ptr.dtype.element_ty),
                         mask=out_mask)
                if HAS_KL:
                    z_tau = tl.where(col_mask[None, :], z * inv_temperature, float("-inf"))
                    z0_tau = tl.where(col_mask[None, :], z0 * inv_temperature, float("-inf"))
                    grad_kl = temperature * (tl.exp(z_tau - m_tau[:, None]) * inv_l_tau[:, None]
                                             - tl.exp(z0_tau - m0[:, None]) * inv_l0[:, None])
                    grad_kl = tl.where(col_mask[None, :], grad_kl, 0.0)
                    tl.store(grad_kl_ptr + out_offs + cols[None, :],
                             grad_kl.to(grad_kl_ptr.dtype.element_ty), mask=out_mask)


def forward_outputs(x: torch.Tensor, c: int, has_kl: bool, compute_grad: bool,
                    padded: bool = False):
    """``(loss_rows, grad_logits, kl_rows, grad_kl_logits)`` of the forward ops, unfilled. They
    never alias one another (custom ops forbid it), the empty ones included. ``padded``: the
    gradients' rows padded to 16 elements (``logit_gradient_layout.logit_gradient_buffer``)."""
    n = x.shape[0]
    loss_rows = torch.empty(n, dtype=torch.float32, device=x.device)
    kl_rows = torch.empty(n if has_kl else 0, dtype=torch.float32, device=x.device)
    grad = logit_gradient_buffer(x, n, c, padded) if compute_grad else x.new_empty((0,))
    grad_kl = (logit_gradient_buffer(x, n, c, padded) if compute_grad and has_kl
               else x.new_empty((0,)))
    return loss_rows, grad, kl_rows, grad_kl


def target_arguments(labels, soft_labels, sample_index, smoothing: float):
    """``(TARGET, table, table_rows)``: the kernel's target kind, the table (None without) and the
    index of each sample's table row (labels for a class-wise table)."""
    if smoothing == 0.0:
        return TARGET_HARD, None, None
    if soft_labels is None:
        return TARGET_UNIFORM, None, None
    return TARGET_TABLE, soft_labels, labels if sample_index is None else sample_index


def loss_arguments(q: float, q_rows: Optional[torch.Tensor]) -> dict:
    """The kernel's task-loss options: none for cross-entropy (the kernel exactly as without
    GCE), else GCE with exponent ``q``, or one per row from the float32 ``q_rows``."""
    if q_rows is not None:
        return dict(GCE=True, Q_PER_ROW=True, q_ptr=q_rows)
    if q == 0.0:
        return {}
    return dict(GCE=True, q=float(q))


def _class_rows(t: torch.Tensor):
    """A class matrix as the products read it, with its inverse row norms: rows scaled by powers
    of two to a largest magnitude near 1 (a C x D copy), so that the float32 product with any
    image row stays in range. float16 rows need no copy: their range cannot overflow it."""
    if t.dtype == torch.float16:
        return t, row_inv_norms(t)
    return scaled_rows(t)


@on_input_device
def clip_loss_forward(image_features: torch.Tensor, text_features: torch.Tensor,
                      zeroshot_text_features: Optional[torch.Tensor], labels: torch.Tensor,
                      scale: torch.Tensor, soft_labels: Optional[torch.Tensor],
                      sample_index: Optional[torch.Tensor], smoothing: float, double_softmax: bool,
                      normalize: bool, temperature: float, compute_grad: bool, q: float = 0.0,
                      q_rows: Optional[torch.Tensor] = None):
    """Launch the forward kernel; returns ``(loss_rows, grad_logits, kl_rows, grad_kl_logits)``
    (the last two empty without ``zeroshot_text_features``; gradients empty without
    ``compute_grad``). Arguments as docs/kernels.md has them (validated by the op layer)."""
    x, t, t0 = image_features, text_features, zeroshot_text_features
    n, d = x.shape
    c = t.shape[0]
    has_kl = t0 is not None
    loss_rows, grad, kl_rows, grad_kl = forward_outputs(x, c, has_kl, compute_grad, padded=True)

    smoothing = float(smoothing)
    target, table, table_rows = target_arguments(labels, soft_labels, sample_index, smoothing)
    x_inv = row_inv_norms(x) if normalize else None
    t, t_inv = _class_rows(t) if normalize else (t, None)
    t0, t0_inv = _class_rows(t0) if normalize and has_kl else (t0, None)

    # Pointers a specialisation never touches get a stand-in (labels) rather than None or an
    # empty tensor's null pointer.
    def ptr(tensor):
        return labels if tensor is None or tensor.numel() == 0 else tensor

    cfg = forward_config(n, c, d, x.dtype, has_kl)
    splits = cfg.pop("C_SPLITS")
    row_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    padded_c = padded_columns(c)

    def launch(grid, **pass_args):
        clip_loss_forward_kernel[grid](
            x, t, ptr(t0), ptr(x_inv), ptr(t_inv), ptr(t0_inv), scale,
            labels, ptr(table_rows), ptr(table),
            loss_rows, ptr(kl_rows), ptr(grad), ptr(grad_kl),
            n, c, d, 1 if table is None else table.shape[0], smoothing, float(temperature),
            padded_c, padded_c, TARGET=target, DOUBLE_SOFTMAX=bool(double_softmax),
            NORMALIZE=bool(normalize), HAS_KL=has_kl, COMPUTE_GRAD=bool(compute_grad),
            CAST_FP32=INTERPRET, PRECISION=dot_precision(x.dtype), **loss_arguments(q, q_rows),
            **cfg, **pass_args)

    if splits == 1:
        launch((row_blocks,))
        return loss_rows, grad, kl_rows, grad_kl
    # Small N: row blocks x class ranges, whole tiles per range (none empty), and the ranges'
    # statistics merged through a float32 workspace.
    c_per_split = triton.cdiv(triton.cdiv(c, cfg["BLOCK_C"]), splits) * cfg["BLOCK_C"]
    splits = triton.cdiv(c, c_per_split)
    partials = torch.empty((NUM_PARTIALS, splits, n), dtype=torch.float32, device=x.device)
    split_args = dict(partial_ptr=partials, c_per_split=c_per_split, splits=splits)
    launch((row_blocks, splits), PASS=1, **split_args)
    if double_softmax:
        launch((row_blocks, splits), PASS=2, **split_args)
    launch((row_blocks, splits if compute_grad else 1), PASS=3, **split_args)
    return loss_rows, grad, kl_rows, grad_kl
