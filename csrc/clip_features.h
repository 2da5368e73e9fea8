// Tensor-side helpers shared by the CPU loss kernels: float32 operands for the BLAS products,
// inverse row norms, the forward's product schedule, the targets of each row.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "softmax_rows.h"

namespace fastprompt_cpp {

inline at::Tensor as_float(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat ? x.contiguous() : x.to(at::kFloat).contiguous();
}

// The scale as a number; non-finite raises ValueError with fastprompt._validation's message
// (the Python layer leaves this value check to the C++ kernels).
inline double read_scale(const at::Tensor& scale) {
  TORCH_CHECK(scale.numel() == 1, "scale: expected a 0-d tensor");
  const double s = scale.item<double>();
  TORCH_CHECK_VALUE(std::isfinite(s), "scale: must be finite");
  return s;
}

// ValueError naming `name` unless every value of the int64 vector lies in [0, bound).
inline void check_index_range(const int64_t* v, int64_t n, int64_t bound, const char* name,
                              const char* what) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok = ok && v[i] >= 0 && v[i] < bound;
  TORCH_CHECK_VALUE(ok, name, ": values must lie in [0, ", bound, ")", what);
}

inline void check_features(const at::Tensor& x, const at::Tensor& t, const at::Tensor& labels) {
  TORCH_CHECK(x.dim() == 2 && t.dim() == 2 && x.size(1) == t.size(1),
              "image_features/text_features: expected N x D and C x D");
  TORCH_CHECK(x.scalar_type() == t.scalar_type(), "text_features: dtype differs from image_features'");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0) && labels.scalar_type() == at::kLong,
              "labels: expected N int64 values");
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

// 1/||row|| of each row of a float32 matrix (1 without normalize), in one parallel pass and
// without ATen temporaries. With `name`, that same pass is the input's value check (so the
// Python layer does not read the matrix once more for it): a row whose sum of squares is NaN or
// inf (a NaN or inf element, or finite values so large that it overflows) or, when normalising,
// zero raises ValueError naming the argument, with the messages of fastprompt._validation.
inline std::vector<float> inv_row_norms(const at::Tensor& rows32, bool normalize,
                                        const char* name = nullptr) {
  const int64_t R = rows32.size(0);
  const int64_t D = rows32.size(1);
  std::vector<float> inv(R, 1.0f);
  if (!normalize && name == nullptr) {
    return inv;
  }
  std::vector<float> squares(R);
  const float* p = rows32.data_ptr<float>();
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* v = p + r * D;
      float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
      for (int64_t k = 0; k < D; ++k) sq += v[k] * v[k];
      squares[r] = sq;
    }
  });
  if (name != nullptr) {
    bool finite = true, nonzero = true;
    for (const float sq : squares) {
      finite = finite && std::isfinite(sq);
      nonzero = nonzero && sq > 0.0f;
    }
    TORCH_CHECK_VALUE(finite, name, ": contains NaN or infinite values (or values so large that "
                      "a row's norm overflows)");
    TORCH_CHECK_VALUE(!normalize || nonzero, name,
                      ": a row has zero norm and cannot be normalised");
  }
  if (normalize) {
    for (int64_t r = 0; r < R; ++r) inv[r] = 1.0f / std::sqrt(squares[r]);
  }
  return inv;
}

// Rows per block of the blocked logits product: about 512 kB of float32 logits, so that a block
// is still in the core's L2 cache when the row passes read it back; at least one block per
// thread, so small batches still use every core.
inline int64_t logit_block_rows(int64_t N, int64_t C) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t cache_rows = std::max<int64_t>(16, (int64_t{1} << 17) / std::max<int64_t>(C, 1));
  return std::max<int64_t>(1, std::min(cache_rows, (N + threads - 1) / threads));
}

// The forward's schedule: raw logits X Fᵀ against one or two class matrices F (float32, C x D),
// then `rows_fn(begin, end, z)` on rows [begin, end) (z: float32 pointers to row `begin` of each
// product, row stride C), in parallel.
// * Every product is an output (float32 logit gradients, `outputs[k]` N x C defined): one
//   multithreaded BLAS product per class matrix into it, then the row passes. (Measured on 2
//   cores at N=4096, C=1000, D=512, best of 3: doing the products a cache-sized block at a time,
//   single-threaded BLAS per block so that the row passes find the block in L2, took 26.0 vs
//   25.6 ms for cross-entropy, 29.4 vs 27.3 ms for DSPT, 64.5 vs 53.1 ms for ProGrad's two
//   products: per-block products lose more than the row passes gain from the cache.)
// * Otherwise (inference, half-precision inputs): the product of a block of rows goes to
//   per-thread scratch (single-threaded BLAS inside the parallel loop) and the row passes run on
//   it there, so no N x C float32 buffer exists at all.
template <typename RowsFn>
void for_each_logit_block(const at::Tensor& x32, const std::vector<at::Tensor>& classes,
                          const std::vector<at::Tensor>& outputs, RowsFn rows_fn) {
  const int64_t N = x32.size(0);
  const int64_t C = classes[0].size(0);
  // Detached: inside the op the inputs may still carry requires_grad, which out= products refuse.
  const at::Tensor x_rows = x32.detach();
  std::vector<at::Tensor> class_t;
  for (const auto& f : classes) class_t.push_back(f.detach().t());
  bool all_outputs = outputs.size() >= classes.size();
  for (size_t k = 0; all_outputs && k < classes.size(); ++k) all_outputs = outputs[k].defined();
  if (all_outputs) {
    std::vector<float*> base(classes.size());
    for (size_t k = 0; k < classes.size(); ++k) {
      at::mm_out(const_cast<at::Tensor&>(outputs[k]), x_rows, class_t[k]);
      base[k] = outputs[k].data_ptr<float>();
    }
    const int64_t grain = std::max<int64_t>(1, 16384 / (C * static_cast<int64_t>(classes.size())));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      std::vector<float*> z(classes.size());
      for (size_t k = 0; k < classes.size(); ++k) z[k] = base[k] + begin * C;
      rows_fn(begin, end, z);
    });
    return;
  }
  const int64_t block = logit_block_rows(N, C);
  const int64_t blocks = (N + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<at::Tensor> scratch(classes.size());
    std::vector<float*> z(classes.size());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * block;
      const int64_t rows = std::min(block, N - r0);
      const at::Tensor xb = x_rows.narrow(0, r0, rows);
      for (size_t k = 0; k < classes.size(); ++k) {
        if (!scratch[k].defined()) scratch[k] = at::empty({block, C}, x32.options());
        at::Tensor out = scratch[k].narrow(0, 0, rows);
        at::mm_out(out, xb, class_t[k]);
        z[k] = out.data_ptr<float>();
      }
      rows_fn(r0, r0 + rows, z);
    }
  });
}

// The logit gradient in the input dtype: the float32 buffer itself, or a half-precision copy.
inline at::Tensor in_dtype(const at::Tensor& buffer, at::ScalarType dtype) {
  return buffer.scalar_type() == dtype ? buffer : buffer.to(dtype);
}

} // namespace fastprompt_cpp
