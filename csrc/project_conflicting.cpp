// CPU kernel of fastprompt::project_conflicting_, ProGrad's projection: per tensor pair,
// g <- g - lam <g,h>/||h||^2 h where <g,h> < 0, in place.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace fastprompt {
namespace {

// Elements per chunk of the projection: each chunk's partial sums are formed in order and then
// added in chunk order, so the result does not depend on the thread count.
constexpr int64_t kProjectionChunk = 1 << 15;

// <g,h>, <h,h> and <g,g> of one pair, in the accumulation type, over contiguous memory.
struct PairSums {
  double gh = 0, hh = 0, gg = 0;
};

template <typename scalar_t>
PairSums pair_sums(const scalar_t* g, const scalar_t* h, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>; // float for float/half/bfloat16, double for double
  const int64_t chunks = (n + kProjectionChunk - 1) / kProjectionChunk;
  std::vector<acc_t> gh(chunks), hh(chunks), gg(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t lo = k * kProjectionChunk;
      const int64_t hi = std::min(n, lo + kProjectionChunk);
      acc_t dot = 0, sq = 0, gsq = 0;
#pragma omp simd reduction(+ : dot, sq, gsq)
      for (int64_t j = lo; j < hi; ++j) {
        const acc_t gj = static_cast<acc_t>(g[j]);
        const acc_t hj = static_cast<acc_t>(h[j]);
        dot += gj * hj;
        sq += hj * hj;
        gsq += gj * gj;
      }
      gh[k] = dot;
      hh[k] = sq;
      gg[k] = gsq;
    }
  });
  acc_t dot = 0, sq = 0, gsq = 0;
  for (int64_t k = 0; k < chunks; ++k) {
    dot += gh[k];
    sq += hh[k];
    gsq += gg[k];
  }
  return {static_cast<double>(dot), static_cast<double>(sq), static_cast<double>(gsq)};
}

// g <- g - lam <g,h>/||h||^2 h where <g,h> < 0 (h == 0 gives <g,h> == 0: no projection).
template <typename scalar_t>
void apply_projection(scalar_t* g, const scalar_t* h, int64_t n, const PairSums& sums,
                      double lam) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t dot = static_cast<acc_t>(sums.gh);
  const acc_t sq = static_cast<acc_t>(sums.hh);
  if (!(dot < 0 && sq > 0)) {
    return;
  }
  const acc_t coef = static_cast<acc_t>(lam) * dot / sq;
  const int64_t chunks = (n + kProjectionChunk - 1) / kProjectionChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const int64_t lo = begin * kProjectionChunk;
    const int64_t hi = std::min(n, end * kProjectionChunk);
#pragma omp simd
    for (int64_t j = lo; j < hi; ++j) {
      g[j] = static_cast<scalar_t>(static_cast<acc_t>(g[j]) - coef * static_cast<acc_t>(h[j]));
    }
  });
}

// One reduction pass over every pair, then (with check_finite) the finiteness check of every
// tensor from those same sums -- <g,g> and <h,h> are NaN or inf exactly when the tensor holds a
// NaN or inf (or values whose squares overflow) -- raising ValueError naming
// `grads_name[indices[k]]` / `ref_grads_name[indices[k]]` before anything is written, then the
// update pass over the conflicting pairs, whose version counters it bumps (as an in-place torch
// op would, so that autograd refuses a graph that saved them).
void project_conflicting_(at::TensorList grads, at::TensorList ref_grads, double lam,
                          bool check_finite, c10::string_view grads_name,
                          c10::string_view ref_grads_name, at::OptionalIntArrayRef indices) {
  TORCH_CHECK(grads.size() == ref_grads.size(),
              "ref_grads: expected one tensor per tensor of grads, got ", ref_grads.size(),
              " for ", grads.size());
  const size_t K = grads.size();
  std::vector<at::Tensor> work(K), refs(K);
  std::vector<PairSums> sums(K);
  for (size_t k = 0; k < K; ++k) {
    const at::Tensor& g = grads[k];
    TORCH_CHECK(ref_grads[k].numel() == g.numel() &&
                    ref_grads[k].scalar_type() == g.scalar_type(),
                "ref_grads: tensor ", k, " differs from grads' in size or dtype");
    if (g.numel() == 0) {
      continue;
    }
    refs[k] = ref_grads[k].contiguous();
    work[k] = g.is_contiguous() ? g : g.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "pair_sums", [&] {
      sums[k] = pair_sums<scalar_t>(work[k].data_ptr<scalar_t>(), refs[k].data_ptr<scalar_t>(),
                                    g.numel());
    });
  }
  TORCH_CHECK(!indices.has_value() || indices->size() == K,
              "indices: expected one per tensor of grads");
  auto index = [&](size_t k) { return indices.has_value() ? (*indices)[k] : static_cast<int64_t>(k); };
  if (check_finite) {
    const std::string gname(grads_name), rname(ref_grads_name);
    const char* what = ": contains NaN or infinite values (or values so large that its norm "
                       "overflows)";
    for (size_t k = 0; k < K; ++k) {
      TORCH_CHECK_VALUE(!work[k].defined() || std::isfinite(sums[k].gg), gname, "[", index(k),
                        "]", what);
    }
    for (size_t k = 0; k < K; ++k) {
      TORCH_CHECK_VALUE(!work[k].defined() || std::isfinite(sums[k].hh), rname, "[", index(k),
                        "]", what);
    }
  }
  for (size_t k = 0; k < K; ++k) {
    if (!work[k].defined()) {
      continue;
    }
    const at::Tensor& g = grads[k];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                    "project_conflicting_", [&] {
      apply_projection<scalar_t>(work[k].data_ptr<scalar_t>(), refs[k].data_ptr<scalar_t>(),
                                 g.numel(), sums[k], lam);
    });
    if (!work[k].is_same(g)) {
      g.copy_(work[k]);
    } else {
      g.unsafeGetTensorImpl()->bump_version();
    }
  }
}

} // namespace

// The schema is defined once, in Python (fastprompt/ops); this registers the CPU kernel.
TORCH_LIBRARY_IMPL(fastprompt, CPU, m) {
  m.impl("project_conflicting_", &project_conflicting_);
}

} // namespace fastprompt
