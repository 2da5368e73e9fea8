// CPU kernels of ProGrad:
// * fastprompt_cpp::prograd_losses_forward: the task loss (cross-entropy or DSPT) and the
//   distillation loss against the zero-shot logits, with both logit gradients, in one pass per
//   row after two BLAS products (with float32 gradients wanted the two N x C buffers are the two
//   outputs; otherwise per-thread blocks, see for_each_logit_block).
// * fastprompt_cpp::project_conflicting_: g <- g - lam <g,h>/||h||^2 h where <g,h> < 0, per
//   tensor pair, in place.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

template <typename scalar_t>
void project_pair(scalar_t* g, const scalar_t* h, int64_t n, double lam) {
  using acc_t = at::opmath_type<scalar_t>; // float for float/half/bfloat16, double for double
  const int64_t chunks = (n + kProjectionChunk - 1) / kProjectionChunk;
  std::vector<acc_t> gh(chunks), hh(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t lo = k * kProjectionChunk;
      const int64_t hi = std::min(n, lo + kProjectionChunk);
      acc_t dot = 0, sq = 0;
#pragma omp simd reduction(+ : dot, sq)
      for (int64_t j = lo; j < hi; ++j) {
        const acc_t hj = static_cast<acc_t>(h[j]);
        dot += static_cast<acc_t>(g[j]) * hj;
        sq += hj * hj;
      }
      gh[k] = dot;
      hh[k] = sq;
    }
  });
  acc_t dot = 0, sq = 0;
  for (int64_t k = 0; k < chunks; ++k) {
    dot += gh[k];
    sq += hh[k];
  }
  // h == 0 gives dot == 0: no projection, no 0/0.
  if (!(dot < 0 && sq > 0)) {
    return;
  }
  const acc_t coef = static_cast<acc_t>(lam) * dot / sq;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const int64_t lo = begin * kProjectionChunk;
    const int64_t hi = std::min(n, end * kProjectionChunk);
#pragma omp simd
    for (int64_t j = lo; j < hi; ++j) {
      g[j] = static_cast<scalar_t>(static_cast<acc_t>(g[j]) - coef * static_cast<acc_t>(h[j]));
    }
  });
}

void project_conflicting_(at::TensorList grads, at::TensorList ref_grads, double lam) {
  TORCH_CHECK(grads.size() == ref_grads.size(),
              "ref_grads: expected one tensor per tensor of grads, got ", ref_grads.size(),
              " for ", grads.size());
  for (size_t k = 0; k < grads.size(); ++k) {
    const at::Tensor& g = grads[k];
    TORCH_CHECK(ref_grads[k].numel() == g.numel() &&
                    ref_grads[k].scalar_type() == g.scalar_type(),
                "ref_grads: tensor ", k, " differs from grads' in size or dtype");
    if (g.numel() == 0) {
      continue;
    }
    const at::Tensor h = ref_grads[k].contiguous();
    at::Tensor work = g.is_contiguous() ? g : g.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                    "project_conflicting_", [&] {
      project_pair<scalar_t>(work.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), g.numel(), lam);
    });
    if (!work.is_same(g)) {
      g.copy_(work);
    }
  }
}

} // namespace

TORCH_LIBRARY_FRAGMENT(fastprompt_cpp, m) {
  m.def(
      "prograd_losses_forward(Tensor image_features, Tensor text_features, "
      "Tensor zeroshot_text_features, Tensor labels, Tensor scale, Tensor? soft_labels, "
      "Tensor? sample_index, float smoothing, bool double_softmax, float temperature, "
      "bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("project_conflicting_(Tensor(a!)[] grads, Tensor[] ref_grads, float lam) -> ()");
}

TORCH_LIBRARY_IMPL(fastprompt_cpp, CPU, m) {
  m.impl("prograd_losses_forward", &prograd_losses_forward);
  m.impl("project_conflicting_", &project_conflicting_);
}

} // namespace fastprompt_cpp
