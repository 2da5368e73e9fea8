// Branch-free exp and expm1 for the row loops: std::exp is a scalar libm call per element,
// which blocks vectorisation.
#pragma once

#include <cstdint>
#include <cstring>

// The row loops only vectorise if the exp helpers are inlined into them; GCC does not always
// choose to (it left fast_exp as an out-of-line call in the extension build).
#if defined(__GNUC__)
#define FASTPROMPT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FASTPROMPT_ALWAYS_INLINE inline
#endif

namespace fastprompt {

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

// e^x - 1 for x <= 0 (the terms of GCE, exponentials of q log u), to about 1 ulp relative where
// it matters, near 0 (expm1_unit on [-1, 0]); below -1, e^x - 1 from fast_exp loses nothing
// (|e^x - 1| > 0.63). Branch-free; a rounding hair above 0 is fine.
FASTPROMPT_ALWAYS_INLINE float expm1_neg(float x) {
  const float near = expm1_unit(x < -1.0f ? -1.0f : x);
  const float far = fast_exp(x) - 1.0f;
  return x < -1.0f ? far : near;
}

// e^x and e^x - 1 for x <= 0, each to about 1 ulp relative: e^x - 1 as expm1_neg, and e^x from it
// on [-1, 0] (where e^x >= 0.37 loses nothing) or from fast_exp below (where 1 + (e^x - 1) would
// lose all of a tiny e^x). GCE needs both: e^x - 1 for its loss, e^x for its gradient.
struct ExpPair {
  float e, em;
};
FASTPROMPT_ALWAYS_INLINE ExpPair exp_expm1_neg(float x) {
  const float near = expm1_unit(x < -1.0f ? -1.0f : x);
  const float far = fast_exp(x);
  return {x < -1.0f ? far : 1.0f + near, x < -1.0f ? far - 1.0f : near};
}

} // namespace fastprompt
