// The loss of one row of logits (cross-entropy, DSPT's double softmax, ProGrad's distillation
// term) and its logit gradient written over the row: float32, while the row sits in cache. Every
// loop is written so that GCC vectorises it (-O3; `omp simd` for the reductions, which plain -O3
// would keep scalar to preserve the order of float additions).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "fast_math.h"
#include "targets.h"

namespace fastprompt {

// z_c <- f * g_c * z_c; returns max(z). Also folds 1/||t_c|| (g), so that the class matrix is
// never copied just to be normalised.
inline float scale_and_max(float* z, int64_t n, float f, const float* g) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < n; ++c) {
    const float v = z[c] * (f * g[c]);
    z[c] = v;
    m = v > m ? v : m;
  }
  return m;
}

// Cross-entropy of one row of logits z (C values, max m) against t.
// loss = lse(z) - sum_c t_c z_c, written as log(sum e^(z-m)) + sum_c t_c (m - z_c) so that no
// two large numbers are subtracted (sum t = 1). With grad, z becomes softmax(z) - t.
template <TargetKind K>
inline float cross_entropy_row(float* z, int64_t C, float m, const RowTarget& t, bool grad) {
  const float eps_over_c = t.eps / static_cast<float>(C);
  const float gap_y = m - z[t.label];
  float sum_e = 0.0f;
  float smooth_gap = 0.0f; // sum_c eps r_c (m - z_c)
  if (grad) {
#pragma omp simd reduction(+ : sum_e, smooth_gap)
    for (int64_t c = 0; c < C; ++c) {
      const float v = z[c];
      smooth_gap += smooth_weight<K>(t, c, eps_over_c) * (m - v);
      const float e = fast_exp(v - m);
      sum_e += e;
      z[c] = e;
    }
  } else {
#pragma omp simd reduction(+ : sum_e, smooth_gap)
    for (int64_t c = 0; c < C; ++c) {
      const float v = z[c];
      smooth_gap += smooth_weight<K>(t, c, eps_over_c) * (m - v);
      sum_e += fast_exp(v - m);
    }
  }
  const float loss = std::log(sum_e) + (1.0f - t.eps) * gap_y + smooth_gap;
  if (grad) {
    const float inv = 1.0f / sum_e;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      z[c] = z[c] * inv - smooth_weight<K>(t, c, eps_over_c);
    }
    z[t.label] -= 1.0f - t.eps;
  }
  return loss;
}

// DSPT: p = softmax(z), q = softmax(p); loss = lse(p) - sum_c t_c p_c.
// The max of p is 1/sum_c e^(z_c - m) (the max logit's term is exactly 1). With
// v_c = e^(p_c - p_max) - 1 in (-1, 0] and S = C + sum v = sum e^(p - p_max):
//   loss = log S + sum_c t_c (p_max - p_c)                  (exactly 0 for C == 1)
//   q_c - sum_k p_k q_k = (v_c - sum_k p_k v_k) / S          (uses sum p = 1)
// Working with v rather than e^p keeps the differences between the q_c, which are of the order
// of the spread of p (tiny for flat rows), free of cancellation against 1. With grad, z becomes
// p (g - sum_k p_k g_k), g = q - t; `scratch` (C floats) holds v meanwhile.
template <TargetKind K>
inline float double_softmax_row(float* z, int64_t C, float m, const RowTarget& t, bool grad,
                                float* scratch) {
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
  float smooth_gap = 0.0f; // sum eps r (p_max - p)
  float smooth_p = 0.0f;   // sum eps r p
  if (grad) {
#pragma omp simd reduction(+ : sum_v, sum_pv, smooth_gap, smooth_p)
    for (int64_t c = 0; c < C; ++c) {
      const float p = z[c] * inv;
      const float v = expm1_unit(p - p_max);
      const float w = smooth_weight<K>(t, c, eps_over_c);
      sum_v += v;
      sum_pv += p * v;
      smooth_gap += w * (p_max - p);
      smooth_p += w * p;
      z[c] = p;
      scratch[c] = v;
    }
  } else {
#pragma omp simd reduction(+ : sum_v, smooth_gap)
    for (int64_t c = 0; c < C; ++c) {
      const float p = z[c] * inv;
      sum_v += expm1_unit(p - p_max);
      smooth_gap += smooth_weight<K>(t, c, eps_over_c) * (p_max - p);
    }
  }
  const float sum_exp = static_cast<float>(C) + sum_v;
  const float loss = std::log(sum_exp) + (1.0f - t.eps) * (p_max - p_y) + smooth_gap;
  if (grad) {
    const float inv_sum = 1.0f / sum_exp;
    const float target_p = (1.0f - t.eps) * p_y + smooth_p; // sum_c t_c p_c
    // g_c - sum_k p_k g_k = (q_c - sum p q) - t_c + sum t p
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      z[c] = z[c] * ((scratch[c] - sum_pv) * inv_sum - smooth_weight<K>(t, c, eps_over_c) +
                     target_p);
    }
    z[t.label] -= (1.0f - t.eps) * p_y;
  }
  return loss;
}

// The task loss of one row (cross-entropy or DSPT), dispatched on the target kind once per row.
inline float task_loss_row(float* z, int64_t C, float m, const RowTarget& t, TargetKind kind,
                           bool double_softmax, bool grad, float* scratch) {
  switch (kind) {
    case TargetKind::Table:
      return double_softmax ? double_softmax_row<TargetKind::Table>(z, C, m, t, grad, scratch)
                            : cross_entropy_row<TargetKind::Table>(z, C, m, t, grad);
    case TargetKind::Uniform:
      return double_softmax ? double_softmax_row<TargetKind::Uniform>(z, C, m, t, grad, scratch)
                            : cross_entropy_row<TargetKind::Uniform>(z, C, m, t, grad);
    default:
      return double_softmax ? double_softmax_row<TargetKind::Hard>(z, C, m, t, grad, scratch)
                            : cross_entropy_row<TargetKind::Hard>(z, C, m, t, grad);
  }
}

// ProGrad's distillation term for one row: kl = -tau^2 sum_c softmax(z0/tau)_c log softmax(z/tau)_c
// = tau sum_c b_c (m - z_c) + tau^2 log sum_c e^((z_c - m)/tau), with b = softmax(z0/tau).
// z (max m) is only read; with grad, z0 (max m0) becomes tau (softmax(z/tau) - softmax(z0/tau)),
// and `scratch` (C floats) holds e^((z-m)/tau) meanwhile.
inline float distillation_row(const float* z, float* z0, int64_t C, float m, float m0, float tau,
                              bool grad, float* scratch) {
  const float inv_tau = 1.0f / tau;
  float sum_a = 0.0f;   // sum e^((z - m)/tau)
  float sum_b = 0.0f;   // sum e^((z0 - m0)/tau)
  float sum_bgap = 0.0f; // sum e^((z0 - m0)/tau) (m - z)
  if (grad) {
#pragma omp simd reduction(+ : sum_a, sum_b, sum_bgap)
    for (int64_t c = 0; c < C; ++c) {
      const float a = fast_exp((z[c] - m) * inv_tau);
      const float b = fast_exp((z0[c] - m0) * inv_tau);
      sum_a += a;
      sum_b += b;
      sum_bgap += b * (m - z[c]);
      scratch[c] = a;
      z0[c] = b;
    }
  } else {
#pragma omp simd reduction(+ : sum_a, sum_b, sum_bgap)
    for (int64_t c = 0; c < C; ++c) {
      const float b = fast_exp((z0[c] - m0) * inv_tau);
      sum_a += fast_exp((z[c] - m) * inv_tau);
      sum_b += b;
      sum_bgap += b * (m - z[c]);
    }
  }
  const float kl = tau * sum_bgap / sum_b + tau * tau * std::log(sum_a);
  if (grad) {
    const float ta = tau / sum_a;
    const float tb = tau / sum_b;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      z0[c] = scratch[c] * ta - z0[c] * tb;
    }
  }
  return kl;
}

} // namespace fastprompt
