// The robust task losses of one row: GCE (generalized cross-entropy, Zhang & Sabuncu 2018) over
// softmax(z) or over DSPT's double softmax, with MAE its q = 1 case, every target kind; and
// `loss_row`, which picks each row's loss from its exponent q (0: the cross-entropy rows of
// row_losses.h, unchanged). Float32, while the row sits in cache, written so that GCC vectorises
// every loop (docs/math.md has the formulas).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "fast_math.h"
#include "operands.h"
#include "row_losses.h"
#include "targets.h"

namespace fastprompt {

// Each row's GCE exponent: `q` for every row, or one per row from a float tensor (0 makes a
// row cross-entropy: NLPrompt's clean rows next to its MAE rows, in one call). The per-row values
// are range-checked here (ValueError with fastprompt._validation's message): the Python layer
// leaves this value check to the C++ kernels.
struct LossExponents {
  float q = 0.0f;
  const float* rows = nullptr;
  at::Tensor rows_; // keeps a float32 copy alive while `rows` is in use

  LossExponents(double q_in, const std::optional<at::Tensor>& q_rows, int64_t N)
      : q(static_cast<float>(q_in)) {
    TORCH_CHECK_VALUE(q_in >= 0.0 && q_in <= 1.0,
                      "q: must lie in [0, 1] (0: cross-entropy, 1: MAE), got ", q_in);
    if (!q_rows.has_value() || !q_rows->defined()) {
      return;
    }
    TORCH_CHECK(q_rows->dim() == 1 && q_rows->size(0) == N && q_rows->is_floating_point(),
                "q: expected one float value per row");
    rows_ = as_float(*q_rows);
    rows = rows_.data_ptr<float>();
    bool ok = true;
    for (int64_t i = 0; i < N; ++i) ok = ok && rows[i] >= 0.0f && rows[i] <= 1.0f; // NaN fails
    TORCH_CHECK_VALUE(ok, "q: values must lie in [0, 1] (0: cross-entropy, 1: MAE)");
  }

  bool any_gce() const { return rows != nullptr || q != 0.0f; }
  float at(int64_t i) const { return rows != nullptr ? rows[i] : q; }
};

// GCE of one row of logits z (C values, max m) against t, exponent q in (0, 1]. With
// u = softmax(z), log u_c = (z_c - m) - log l (l = sum e^(z - m) >= 1), and
//   E = sum_c t_c e^(q (z_c - m)),   F = sum_c t_c expm1(q (z_c - m)) = E - 1  in [-1, 0],
//   H = expm1(-q log l)  in (-1, 0],
// sum_c t_c u_c^q = E (1 + H), so
//   loss = sum_c t_c (1 - u_c^q) / q = (-F - H E) / q,
// non-negative terms: no cancellation, whatever q (as q -> 0 it tends to cross-entropy). F and
// H serve the loss (accurate where E and 1 + H are near 1), E and 1 + H = l^-q, each summed or
// taken directly, the gradient (to a few ulps relative however small): with grad, z becomes
// dloss/dz_c = u_c A - t_c u_c^q, A = E (1 + H) (for a hard label A (u_c - [c = y]), A times
// the cross-entropy gradient); `scratch` (C floats, soft targets) holds e^(q (z_c - m)).
template <TargetKind K>
inline float gce_row(float* z, int64_t C, float m, const RowTarget& t, float q, bool grad,
                     float* scratch) {
  const float eps_over_c = t.eps / static_cast<float>(C);
  const ExpPair y = exp_expm1_neg(q * (z[t.label] - m));
  float sum_e = 0.0f;
  float smooth_f = 0.0f; // sum_c eps r_c expm1(q (z_c - m))
  float smooth_e = 0.0f; // sum_c eps r_c e^(q (z_c - m))
  if constexpr (K == TargetKind::Hard) {
    if (grad) {
#pragma omp simd reduction(+ : sum_e)
      for (int64_t c = 0; c < C; ++c) {
        const float e = fast_exp(z[c] - m);
        sum_e += e;
        z[c] = e;
      }
    } else {
#pragma omp simd reduction(+ : sum_e)
      for (int64_t c = 0; c < C; ++c) sum_e += fast_exp(z[c] - m);
    }
  } else if (grad) {
#pragma omp simd reduction(+ : sum_e, smooth_f, smooth_e)
    for (int64_t c = 0; c < C; ++c) {
      const float v = z[c] - m;
      const float e = fast_exp(v);
      const ExpPair w = exp_expm1_neg(q * v);
      const float r = smooth_weight<K>(t, c, eps_over_c);
      smooth_f += r * w.em;
      smooth_e += r * w.e;
      sum_e += e;
      z[c] = e;
      scratch[c] = w.e;
    }
  } else {
#pragma omp simd reduction(+ : sum_e, smooth_f)
    for (int64_t c = 0; c < C; ++c) {
      const float v = z[c] - m;
      smooth_f += smooth_weight<K>(t, c, eps_over_c) * expm1_neg(q * v);
      sum_e += fast_exp(v);
    }
  }
  const float f = (1.0f - t.eps) * y.em + smooth_f;
  const float e_sum = (1.0f - t.eps) * y.e + smooth_e;
  const ExpPair h = exp_expm1_neg(-q * std::log(sum_e));
  // In the loss E may be 1 + F (|H| < 1): the same bits with and without the gradient.
  const float loss = (-f - h.em * (1.0f + f)) / q;
  if (grad) {
    const float a = e_sum * h.e;
    const float a_over_l = a / sum_e;
    if constexpr (K == TargetKind::Hard) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) z[c] = z[c] * a_over_l;
      z[t.label] -= a;
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        z[c] = z[c] * a_over_l - smooth_weight<K>(t, c, eps_over_c) * scratch[c] * h.e;
      }
      z[t.label] -= (1.0f - t.eps) * y.e * h.e;
    }
  }
  return loss;
}

// GCE under DSPT's double softmax: p = softmax(z), u = softmax(p). As in double_softmax_row,
// relative to p_max = max p: v_c = expm1(p_c - p_max), S = sum e^(p - p_max) = C + sum v >= 1,
// u_c = (1 + v_c) / S, and with w_c = e^(q (p_c - p_max)) = 1 + expm1(q (p_c - p_max)) (in
// [e^-1, 1]: 1 + F loses nothing here),
//   F = sum_c t_c (w_c - 1),   H = expm1(-q log S),   loss = (-F - H (1 + F)) / q.
// The gradient goes through the first softmax: with g = dloss/dp = u A - a (a_c = t_c u_c^q =
// t_c w_c S^-q, A = sum a = (1 + F) S^-q, S^-q taken directly),
//   dloss/dz_c = p_c (g_c - sum_k p_k g_k)
//              = p_c (A (v_c - sum_k p_k v_k) / S - (1 + H) (t_c w_c - sum_k p_k t_k w_k)),
// the differences of u taken through v as double_softmax_row does (flat rows keep their spread).
// `scratch` (C floats) holds v meanwhile.
template <TargetKind K>
inline float gce_double_softmax_row(float* z, int64_t C, float m, const RowTarget& t, float q,
                                    bool grad, float* scratch) {
  const float eps_over_c = t.eps / static_cast<float>(C);
  float sum_e = 0.0f;
#pragma omp simd reduction(+ : sum_e)
  for (int64_t c = 0; c < C; ++c) {
    const float e = fast_exp(z[c] - m);
    sum_e += e;
    z[c] = e;
  }
  const float inv = 1.0f / sum_e;
  const float p_max = inv;
  const float p_y = z[t.label] * inv;
  float sum_v = 0.0f;
  float sum_pv = 0.0f;
  float smooth_f = 0.0f;  // sum_c eps r_c (w_c - 1)
  float smooth_pw = 0.0f; // sum_c eps r_c p_c w_c
  if (grad) {
#pragma omp simd reduction(+ : sum_v, sum_pv, smooth_f, smooth_pw)
    for (int64_t c = 0; c < C; ++c) {
      const float p = z[c] * inv;
      const float v = expm1_unit(p - p_max);
      sum_v += v;
      sum_pv += p * v;
      if constexpr (K != TargetKind::Hard) {
        const float w = smooth_weight<K>(t, c, eps_over_c);
        const float em = expm1_neg(q * (p - p_max));
        smooth_f += w * em;
        smooth_pw += w * p * (1.0f + em);
      }
      z[c] = p;
      scratch[c] = v;
    }
  } else {
#pragma omp simd reduction(+ : sum_v, smooth_f)
    for (int64_t c = 0; c < C; ++c) {
      const float p = z[c] * inv;
      sum_v += expm1_unit(p - p_max);
      if constexpr (K != TargetKind::Hard) {
        smooth_f += smooth_weight<K>(t, c, eps_over_c) * expm1_neg(q * (p - p_max));
      }
    }
  }
  const float sum_exp = static_cast<float>(C) + sum_v;
  const float f_y = expm1_neg(q * (p_y - p_max));
  const float f = (1.0f - t.eps) * f_y + smooth_f;
  const ExpPair h = exp_expm1_neg(-q * std::log(sum_exp));
  const float loss = (-f - h.em * (1.0f + f)) / q;
  if (grad) {
    const float h1 = h.e;
    const float a_over_s = (1.0f + f) * h1 / sum_exp;
    const float label_tw = (1.0f - t.eps) * (1.0f + f_y); // the label's share of t_y w_y
    const float ptw = p_y * label_tw + smooth_pw;          // sum_k p_k t_k w_k
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float p = z[c];
      float tw = 0.0f;
      if constexpr (K != TargetKind::Hard) {
        tw = smooth_weight<K>(t, c, eps_over_c) * (1.0f + expm1_neg(q * (p - p_max)));
      }
      z[c] = p * (a_over_s * (scratch[c] - sum_pv) - h1 * (tw - ptw));
    }
    z[t.label] -= p_y * h1 * label_tw;
  }
  return loss;
}

// The task loss of one row with exponent q: cross-entropy or DSPT exactly as task_loss_row
// computes them when q == 0, else GCE (MAE at q == 1); dispatched on the target kind once per row.
inline float loss_row(float* z, int64_t C, float m, const RowTarget& t, TargetKind kind,
                      bool double_softmax, bool grad, float* scratch, float q) {
  if (q == 0.0f) {
    return task_loss_row(z, C, m, t, kind, double_softmax, grad, scratch);
  }
  switch (kind) {
    case TargetKind::Table:
      return double_softmax
                 ? gce_double_softmax_row<TargetKind::Table>(z, C, m, t, q, grad, scratch)
                 : gce_row<TargetKind::Table>(z, C, m, t, q, grad, scratch);
    case TargetKind::Uniform:
      return double_softmax
                 ? gce_double_softmax_row<TargetKind::Uniform>(z, C, m, t, q, grad, scratch)
                 : gce_row<TargetKind::Uniform>(z, C, m, t, q, grad, scratch);
    default:
      return double_softmax
                 ? gce_double_softmax_row<TargetKind::Hard>(z, C, m, t, q, grad, scratch)
                 : gce_row<TargetKind::Hard>(z, C, m, t, q, grad, scratch);
  }
}

} // namespace fastprompt
