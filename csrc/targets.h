// Each row's target distribution t = (1 - eps) e_y + eps r: its kind, and where r comes from.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "fast_math.h"
#include "operands.h"

namespace fastprompt {

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

// ValueError naming `name` unless every value of the int64 vector lies in [0, bound).
inline void check_index_range(const int64_t* v, int64_t n, int64_t bound, const char* name,
                              const char* what) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok = ok && v[i] >= 0 && v[i] < bound;
  TORCH_CHECK_VALUE(ok, name, ": values must lie in [0, ", bound, ")", what);
}

// Where each row's target comes from. The labels (and sample indices) are range-checked here,
// raising ValueError with fastprompt._validation's messages: the Python layer leaves these value
// checks to the C++ kernels.
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
    check_index_range(labels, labels_.numel(), C, "labels", "");
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
        check_index_range(sample_index, sample_index_.numel(), table_rows, "sample_index",
                          " (rows of soft_labels)");
      }
    }
  }

  RowTarget row(int64_t i) const {
    RowTarget t;
    t.label = labels[i];
    t.eps = eps;
    t.table_row = nullptr;
    if (kind == TargetKind::Table) {
      t.table_row = table + (sample_index != nullptr ? sample_index[i] : t.label) * num_classes;
    }
    return t;
  }
};

} // namespace fastprompt
