// Row math shared by the CPU loss kernels: one logits row at a time, float32, while the row sits
// in cache. Every loop is written so that GCC vectorises it (-O3; `omp simd` for the reductions,
// which plain -O3 would keep scalar to preserve the order of float additions).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// The row loops only vectorise if the exp helpers are inlined into them; GCC does not always
// choose to (it left fast_exp as an out-of-line call in the extension build).
#if defined(__GNUC__)
#define FASTPROMPT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FASTPROMPT_ALWAYS_INLINE inline
#endif

namespace fastprompt_cpp {

// exp(x) to about 1 ulp for x in [-87, 88]; below -87 it returns ~1.6e-38 instead of 0, which
// no sum or gradient here can notice. std::exp would be a scalar libm call per element (it
// blocks vectorisation); this one is branch-free: x = k ln2 + r with |r| <= ln2/2, then a
// degree-7 Taylor polynomial for e^r (truncation error < 5e-9) times 2^k built in the exponent.
FASTPROMPT_ALWAYS_INLINE float fast_exp(float x) {
  // Ternaries, not std::min/max: those return references, which GCC does not if-convert.
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // Round to nearest by adding and removing 1.5 * 2^23 (vectorises on plain SSE2, unlike rint).
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // ln 2 split in two so that k * ln2_hi is exact for |k| <= 128 (Cody-Waite).
  float r = x - k * 0.693145751953125f;
  r = r - k * 1.428606765330187e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(float));
  return p * two_k;
}

// z <- f * z; returns max(z). Folds the logit scale (and 1/||x_i||) into the row.
inline float scale_and_max(float* z, int64_t n, float f) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < n; ++c) {
    const float v = z[c] * f;
    z[c] = v;
    m = v > m ? v : m;
  }
  return m;
}

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

// Targets t = (1 - eps) e_y + eps r. Hard: eps == 0. Uniform: r = 1/C. Table: r = a row of a
// class-wise (indexed by y) or instance-wise (indexed by sample_index) soft-label table.
enum class TargetKind { Hard, Uniform, Table };

struct RowTarget {
  int64_t label;          // already checked to lie in [0, C)
  float eps;              // smoothing
  const float* table_row; // r for TargetKind::Table, else unused
};

// eps * r_c, the smooth part of the target.
template <TargetKind K>
FASTPROMPT_ALWAYS_INLINE float smooth_weight(const RowTarget& t, int64_t c, float eps_over_c) {
  if constexpr (K == TargetKind::Table) {
    return t.eps * t.table_row[c];
  } else if constexpr (K == TargetKind::Uniform) {
    return eps_over_c;
  } else {
    return 0.0f;
  }
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

// e^x - 1 for x in [-1, 0] (the only range the double softmax needs: x = p_c - p_max with
// p in [0, 1]), to about 1 ulp relative everywhere in it, including near 0 where e^x - 1 would
// lose the low bits of x. One branch-free Horner polynomial: the Taylor series to degree 10,
// whose truncation error |x|^11 / 11! is below 4e-8 of |e^x - 1| >= 0.63 |x| on [-1, 0]
// (half a float32 ulp is 6e-8); with |x| <= 1 and alternating terms Horner stays stable.
// Out of range (rounding can put x a hair below -1) it degrades gracefully, never faults.
FASTPROMPT_ALWAYS_INLINE float expm1_unit(float x) {
  float p = 1.0f / 3628800.0f; // 1/10!
  p = p * x + 1.0f / 362880.0f;
  p = p * x + 1.0f / 40320.0f;
  p = p * x + 1.0f / 5040.0f;
  p = p * x + 1.0f / 720.0f;
  p = p * x + 1.0f / 120.0f;
  p = p * x + 1.0f / 24.0f;
  p = p * x + 1.0f / 6.0f;
  p = p * x + 0.5f;
  p = p * x + 1.0f;
  return p * x;
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

} // namespace fastprompt_cpp
