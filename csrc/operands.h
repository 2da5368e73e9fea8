// The kernels' float32 operands: feature matrices with their inverse row norms, the scale, and
// the logit gradient in the input dtype.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastprompt {

inline at::Tensor as_float(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat ? x.contiguous() : x.to(at::kFloat).contiguous();
}

// The logit gradient in the input dtype: the float32 buffer itself, or a half-precision copy.
inline at::Tensor in_dtype(const at::Tensor& buffer, at::ScalarType dtype) {
  return buffer.scalar_type() == dtype ? buffer : buffer.to(dtype);
}

// The scale as a number; non-finite raises ValueError with fastprompt._validation's message
// (the Python layer leaves this value check to the C++ kernels).
inline double read_scale(const at::Tensor& scale) {
  TORCH_CHECK(scale.numel() == 1, "scale: expected a 0-d tensor");
  const double s = scale.item<double>();
  TORCH_CHECK_VALUE(std::isfinite(s), "scale: must be finite");
  return s;
}

inline void check_features(const at::Tensor& x, const at::Tensor& t, const at::Tensor& labels) {
  TORCH_CHECK(x.dim() == 2 && t.dim() == 2 && x.size(1) == t.size(1),
              "image_features/text_features: expected N x D and C x D");
  TORCH_CHECK(x.scalar_type() == t.scalar_type(), "text_features: dtype differs from image_features'");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0) && labels.scalar_type() == at::kLong,
              "labels: expected N int64 values");
}

// A feature matrix as the products read it: `rows` (float32, R x D) and `inv` (R factors) with
// x̂_r = rows_r * inv_r; `inv_norm` is 1/||x_r|| itself. Normally `rows` is the input and
// inv = inv_norm. A row whose sum of
// squares leaves [1e-24, 1e24] (huge or tiny but finite features) would overflow or underflow a
// float32 sum or product, so then the whole matrix is normalised into a copy in double precision
// (norms scaled by the row's largest element) and inv = 1: any finite nonzero row works.
struct FeatureRows {
  at::Tensor rows;
  std::vector<float> inv;
  std::vector<float> inv_norm;
};

// `name`: this pass is also the input's value check (so the Python layer does not read the
// matrix once more for it): a row holding NaN or inf, or a zero row when normalising, raises
// ValueError naming the argument, with the messages of fastprompt._validation.
inline FeatureRows feature_rows(const at::Tensor& x32, bool normalize, const char* name = nullptr) {
  const int64_t R = x32.size(0);
  const int64_t D = x32.size(1);
  FeatureRows out{x32, std::vector<float>(R, 1.0f), std::vector<float>(R, 1.0f)};
  if (!normalize && name == nullptr) {
    return out;
  }
  std::vector<double> inv(R, 1.0);
  std::vector<char> finite(R, 1), nonzero(R, 1), in_range(R, 1);
  const float* p = x32.data_ptr<float>();
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* v = p + r * D;
      float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
      for (int64_t k = 0; k < D; ++k) sq += v[k] * v[k];
      if (sq >= 1e-24f && sq <= 1e24f) {
        inv[r] = 1.0 / std::sqrt(static_cast<double>(sq));
        continue;
      }
      // Rare: rescale by the largest magnitude first, in double.
      double peak = 0.0;
      bool ok = true;
      for (int64_t k = 0; k < D; ++k) {
        ok = ok && std::isfinite(v[k]);
        peak = std::max(peak, std::fabs(static_cast<double>(v[k])));
      }
      finite[r] = ok;
      nonzero[r] = peak > 0.0;
      in_range[r] = 0;
      if (ok && peak > 0.0) {
        double scaled = 0.0;
        for (int64_t k = 0; k < D; ++k) {
          const double u = v[k] / peak;
          scaled += u * u;
        }
        inv[r] = 1.0 / (peak * std::sqrt(scaled));
      }
    }
  });
  bool all_finite = true, all_nonzero = true, all_in_range = true;
  for (int64_t r = 0; r < R; ++r) {
    all_finite = all_finite && finite[r];
    all_nonzero = all_nonzero && nonzero[r];
    all_in_range = all_in_range && in_range[r];
  }
  if (name != nullptr) {
    TORCH_CHECK_VALUE(all_finite, name, ": contains NaN or infinite values");
    TORCH_CHECK_VALUE(!normalize || all_nonzero, name,
                      ": a row has zero norm and cannot be normalised");
  }
  if (!normalize) {
    return out;
  }
  for (int64_t r = 0; r < R; ++r) out.inv_norm[r] = static_cast<float>(inv[r]);
  if (all_in_range) {
    out.inv = out.inv_norm;
    return out;
  }
  out.rows = at::empty({R, D}, x32.options());
  float* q = out.rows.data_ptr<float>();
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t k = 0; k < D; ++k) q[r * D + k] = static_cast<float>(p[r * D + k] * inv[r]);
    }
  });
  return out;
}

} // namespace fastprompt
