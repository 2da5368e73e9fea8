// CPU kernels of ProGrad:
// * fastprompt_cpp::prograd_losses_forward: the task loss (cross-entropy or DSPT) and the
//   distillation loss against the zero-shot logits, with both logit gradients, in one pass per
//   row after two BLAS products (with float32 gradients wanted the two N x C buffers are the two
//   outputs; otherwise per-thread blocks, see for_each_logit_block).
// * fastprompt_cpp::project_conflicting_: g <- g - lam <g,h>/||h||^2 h where <g,h> < 0, per
//   tensor pair, in place; project_conflicting_checked_ also does the Python layer's finiteness
//   checks from the sums of its own reduction pass (no separate read of the gradients).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "clip_features.h"
#include "softmax_rows.h"

namespace fastprompt_cpp {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prograd_losses_forward(
    const at::Tensor& image_features, const at::Tensor& text_features,
    const at::Tensor& zeroshot_text_features, const at::Tensor& labels, const at::Tensor& scale,
    const std::optional<at::Tensor>& soft_labels, const std::optional<at::Tensor>& sample_index,
    double smoothing, bool double_softmax, double temperature, bool compute_grad) {
  check_features(image_features, text_features, labels);
  TORCH_CHECK(zeroshot_text_features.sizes() == text_features.sizes() &&
                  zeroshot_text_features.scalar_type() == text_features.scalar_type(),
              "zeroshot_text_features: expected the shape and dtype of text_features");
  TORCH_CHECK(temperature > 0.0, "temperature: must be positive");
  const int64_t N = image_features.size(0);
  const int64_t C = text_features.size(0);
  const double s = read_scale(scale);

  const at::Tensor x = as_float(image_features);
  const at::Tensor t = as_float(text_features);
  const at::Tensor t0 = as_float(zeroshot_text_features);
  // The features' value checks (finite, no zero row) happen in this pass; see inv_row_norms.
  const std::vector<float> inv_x = inv_row_norms(x, true, "image_features");
  const std::vector<float> inv_t = inv_row_norms(t, true, "text_features");
  const std::vector<float> inv_t0 = inv_row_norms(t0, true, "zeroshot_text_features");
  at::Tensor task_rows = at::empty({N}, x.options());
  at::Tensor kl_rows = at::empty({N}, x.options());
  const Targets targets(labels, soft_labels, sample_index, smoothing, C);
  const float tau = static_cast<float>(temperature);
  // As in clip_cross_entropy_forward: float32 products go straight into the gradient outputs,
  // anything else through per-thread scratch (no N x C buffer at all without compute_grad).
  const at::ScalarType dtype = image_features.scalar_type();
  const bool direct = compute_grad && dtype == at::kFloat;
  std::vector<at::Tensor> grads32 = {direct ? at::empty({N, C}, x.options()) : at::Tensor(),
                                     direct ? at::empty({N, C}, x.options()) : at::Tensor()};
  at::Tensor grad_task = !compute_grad ? at::empty({0}, image_features.options())
                         : direct      ? grads32[0]
                                       : at::empty({N, C}, image_features.options());
  at::Tensor grad_kl = !compute_grad ? at::empty({0}, image_features.options())
                       : direct      ? grads32[1]
                                     : at::empty({N, C}, image_features.options());
  const float sf = static_cast<float>(s);
  float* task_loss = task_rows.data_ptr<float>();
  float* kl_loss = kl_rows.data_ptr<float>();
  for_each_logit_block(x, {t, t0}, grads32, [&](int64_t begin, int64_t end,
                                                 const std::vector<float*>& z_block) {
    std::vector<float> scratch(compute_grad ? C : 0);
    for (int64_t i = begin; i < end; ++i) {
      float* z = z_block[0] + (i - begin) * C;
      float* z0 = z_block[1] + (i - begin) * C;
      const float f = sf * inv_x[i];
      const float m = scale_and_max(z, C, f, inv_t.data());
      const float m0 = scale_and_max(z0, C, f, inv_t0.data());
      // The distillation term reads z before the task loss overwrites it with its gradient.
      kl_loss[i] = distillation_row(z, z0, C, m, m0, tau, compute_grad, scratch.data());
      task_loss[i] = task_loss_row(z, C, m, targets.row(i), targets.kind, double_softmax,
                                   compute_grad, scratch.data());
    }
    if (compute_grad && !direct) {
      const int64_t rows = end - begin;
      grad_task.narrow(0, begin, rows).copy_(at::from_blob(z_block[0], {rows, C}, x.options()));
      grad_kl.narrow(0, begin, rows).copy_(at::from_blob(z_block[1], {rows, C}, x.options()));
    }
  });
  return {task_rows, kl_rows, grad_task, grad_kl};
}

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

// Both projection ops: one reduction pass over every pair, then (with `names`) the finiteness
// check of every tensor from those same sums -- <g,g> and <h,h> are NaN or inf exactly when the
// tensor holds a NaN or inf (or values whose squares overflow) -- raising ValueError before
// anything is written, then the update pass over the conflicting pairs.
void project_pairs(at::TensorList grads, at::TensorList ref_grads, double lam,
                   const std::vector<int64_t>* indices, const std::string* grads_name,
                   const std::string* ref_grads_name) {
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
  if (grads_name != nullptr) {
    const char* what = ": contains NaN or infinite values (or values so large that its norm "
                       "overflows)";
    for (size_t k = 0; k < K; ++k) {
      TORCH_CHECK_VALUE(!work[k].defined() || std::isfinite(sums[k].gg), *grads_name, "[",
                        (*indices)[k], "]", what);
    }
    for (size_t k = 0; k < K; ++k) {
      TORCH_CHECK_VALUE(!work[k].defined() || std::isfinite(sums[k].hh), *ref_grads_name, "[",
                        (*indices)[k], "]", what);
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
    }
  }
}

void project_conflicting_(at::TensorList grads, at::TensorList ref_grads, double lam) {
  project_pairs(grads, ref_grads, lam, nullptr, nullptr, nullptr);
}

// project_conflicting_ with the finiteness checks of the Python layer folded into its reduction
// pass; messages name `grads_name[indices[k]]` / `ref_grads_name[indices[k]]`.
void project_conflicting_checked_(at::TensorList grads, at::TensorList ref_grads, double lam,
                                  at::IntArrayRef indices, c10::string_view grads_name,
                                  c10::string_view ref_grads_name) {
  TORCH_CHECK(indices.size() == grads.size(), "indices: expected one per tensor of grads");
  const std::vector<int64_t> idx(indices.begin(), indices.end());
  const std::string gname(grads_name), rname(ref_grads_name);
  project_pairs(grads, ref_grads, lam, &idx, &gname, &rname);
}

} // namespace

TORCH_LIBRARY_FRAGMENT(fastprompt_cpp, m) {
  m.def(
      "prograd_losses_forward(Tensor image_features, Tensor text_features, "
      "Tensor zeroshot_text_features, Tensor labels, Tensor scale, Tensor? soft_labels, "
      "Tensor? sample_index, float smoothing, bool double_softmax, float temperature, "
      "bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("project_conflicting_(Tensor(a!)[] grads, Tensor[] ref_grads, float lam) -> ()");
  m.def(
      "project_conflicting_checked_(Tensor(a!)[] grads, Tensor[] ref_grads, float lam, "
      "int[] indices, str grads_name, str ref_grads_name) -> ()");
}

TORCH_LIBRARY_IMPL(fastprompt_cpp, CPU, m) {
  m.impl("prograd_losses_forward", &prograd_losses_forward);
  m.impl("project_conflicting_", &project_conflicting_);
  m.impl("project_conflicting_checked_", &project_conflicting_checked_);
}

} // namespace fastprompt_cpp
