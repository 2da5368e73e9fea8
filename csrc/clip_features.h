// Tensor-side helpers shared by the CPU loss kernels: float32 operands for the BLAS products,
// per-row logit multipliers, the targets of each row.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>

#include "softmax_rows.h"

namespace fastprompt_cpp {

// Rows of at most this many floats stay in L1/L2 across the passes of one row; the grain makes
// at::parallel_for hand each thread a few hundred kB of logits at least.
inline int64_t row_grain(int64_t C) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
}

inline at::Tensor as_float(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat ? x.contiguous() : x.to(at::kFloat).contiguous();
}

inline double read_scale(const at::Tensor& scale) {
  TORCH_CHECK(scale.numel() == 1, "scale: expected a 0-d tensor");
  return scale.item<double>();
}

// The class side of the logits product: float32, row-normalised when asked (C x D, small).
inline at::Tensor product_rows(const at::Tensor& rows, bool normalize) {
  at::Tensor f = as_float(rows);
  return normalize ? f / at::linalg_vector_norm(f, 2, at::IntArrayRef{1}, /*keepdim=*/true)
                   : f;
}

// Multiplier of each raw logits row x_i . t_c: s / ||x_i|| (or s), so the N x D image features
// are never copied just to be normalised or scaled.
inline at::Tensor logit_row_factors(const at::Tensor& x_float, double s, bool normalize) {
  if (!normalize) {
    return at::full({x_float.size(0)}, s, x_float.options());
  }
  return at::linalg_vector_norm(x_float, 2, at::IntArrayRef{1}).reciprocal_().mul_(s);
}

inline void check_features(const at::Tensor& x, const at::Tensor& t, const at::Tensor& labels) {
  TORCH_CHECK(x.dim() == 2 && t.dim() == 2 && x.size(1) == t.size(1),
              "image_features/text_features: expected N x D and C x D");
  TORCH_CHECK(x.scalar_type() == t.scalar_type(), "text_features: dtype differs from image_features'");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0) && labels.scalar_type() == at::kLong,
              "labels: expected N int64 values");
}

// Where each row's target comes from; indices are clamped so that unchecked input cannot read
// out of bounds.
struct Targets {
  TargetKind kind = TargetKind::Hard;
  float eps = 0.0f;
  int64_t num_classes = 0;
  const int64_t* labels = nullptr;
  const float* table = nullptr;
  int64_t table_rows = 0;
  const int64_t* sample_index = nullptr;
  // Keep contiguous copies alive while the pointers are in use.
  at::Tensor labels_, table_, sample_index_;

  Targets(const at::Tensor& labels_in, const std::optional<at::Tensor>& soft_labels,
          const std::optional<at::Tensor>& sample_index_in, double smoothing, int64_t C)
      : eps(static_cast<float>(smoothing)), num_classes(C) {
    labels_ = labels_in.contiguous();
    labels = labels_.data_ptr<int64_t>();
    if (smoothing == 0.0) {
      return;
    }
    kind = TargetKind::Uniform;
    if (soft_labels.has_value() && soft_labels->defined()) {
      table_ = as_float(*soft_labels);
      TORCH_CHECK(table_.dim() == 2 && table_.size(1) == C && table_.size(0) > 0,
                  "soft_labels: expected an R x C table");
      kind = TargetKind::Table;
      table = table_.data_ptr<float>();
      table_rows = table_.size(0);
      if (sample_index_in.has_value() && sample_index_in->defined()) {
        sample_index_ = sample_index_in->contiguous();
        TORCH_CHECK(sample_index_.scalar_type() == at::kLong &&
                        sample_index_.numel() == labels_.numel(),
                    "sample_index: expected N int64 values");
        sample_index = sample_index_.data_ptr<int64_t>();
      }
    }
  }

  RowTarget row(int64_t i) const {
    RowTarget t;
    t.label = std::clamp<int64_t>(labels[i], 0, num_classes - 1);
    t.eps = eps;
    t.table_row = nullptr;
    if (kind == TargetKind::Table) {
      const int64_t r = sample_index != nullptr ? sample_index[i] : t.label;
      t.table_row = table + std::clamp<int64_t>(r, 0, table_rows - 1) * num_classes;
    }
    return t;
  }
};

// The logit gradient in the input dtype: the float32 buffer itself, or a half-precision copy.
inline at::Tensor in_dtype(const at::Tensor& buffer, at::ScalarType dtype) {
  return buffer.scalar_type() == dtype ? buffer : buffer.to(dtype);
}

} // namespace fastprompt_cpp
