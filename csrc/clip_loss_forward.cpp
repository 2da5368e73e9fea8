// CPU kernels of the two forward ops, fastprompt::clip_cross_entropy_forward and
// fastprompt::prograd_losses_forward: one driver, with ProGrad's distillation term as a template
// switch (as the Triton kernel has it as a constexpr). The task loss of each row is
// cross-entropy, DSPT or GCE/MAE by its exponent q (robust_losses.h).
//
// One BLAS product per class matrix for the raw logits, then one pass per row while it is in
// cache: scale by s/(||x_i|| ||t_c||) (no normalised copy of either matrix), max, log-sum-exp, the
// double softmax statistics, the target terms, the losses, and the logit gradients written over
// the logits (docs/kernels.md).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "logit_blocks.h"
#include "operands.h"
#include "robust_losses.h"
#include "row_losses.h"
#include "targets.h"

namespace fastprompt {
namespace {

struct ForwardResult {
  at::Tensor task_rows, kl_rows, grad_task, grad_kl;
};

// `zeroshot` is read only when kDistill. The feature matrices' value checks (finite, no zero
// row) happen in the pass that computes their row norms; labels, sample indices and the scale
// are checked as they are read.
template <bool kDistill>
ForwardResult clip_loss_forward(const at::Tensor& image_features, const at::Tensor& text_features,
                                const at::Tensor* zeroshot, const at::Tensor& labels,
                                const at::Tensor& scale,
                                const std::optional<at::Tensor>& soft_labels,
                                const std::optional<at::Tensor>& sample_index, double smoothing,
                                bool double_softmax, bool normalize, double temperature,
                                bool compute_grad, double q,
                                const std::optional<at::Tensor>& q_rows) {
  check_features(image_features, text_features, labels);
  const int64_t N = image_features.size(0);
  const int64_t C = text_features.size(0);
  const float sf = static_cast<float>(read_scale(scale));
  const FeatureRows x = feature_rows(as_float(image_features), normalize, "image_features");
  const FeatureRows t = feature_rows(as_float(text_features), normalize, "text_features");
  std::vector<at::Tensor> classes = {t.rows};
  FeatureRows t0;
  if constexpr (kDistill) {
    t0 = feature_rows(as_float(*zeroshot), true, "zeroshot_text_features");
    classes.push_back(t0.rows);
  }
  const Targets targets(labels, soft_labels, sample_index, smoothing, C);
  const LossExponents exponents(q, q_rows, N);
  const auto options = x.rows.options();

  // float32 input with a gradient wanted: the products are written into the gradient outputs and
  // turned into the gradients in place. Otherwise they go to per-thread scratch (half inputs:
  // the gradients are converted a block at a time into the half-precision outputs).
  const at::ScalarType dtype = image_features.scalar_type();
  const bool direct = compute_grad && dtype == at::kFloat;
  std::vector<at::Tensor> grads32(classes.size());
  std::vector<at::Tensor> grads(classes.size());
  for (size_t k = 0; k < classes.size(); ++k) {
    if (direct) grads32[k] = at::empty({N, C}, options);
    grads[k] = !compute_grad ? at::empty({0}, image_features.options())
               : direct      ? grads32[k]
                             : at::empty({N, C}, image_features.options());
  }
  ForwardResult out;
  out.task_rows = at::empty({N}, options);
  out.kl_rows = at::empty({kDistill ? N : 0}, options);
  float* task_loss = out.task_rows.data_ptr<float>();
  float* kl_loss = kDistill ? out.kl_rows.data_ptr<float>() : nullptr;
  const float tau = static_cast<float>(temperature);
  for_each_logit_block(x.rows, classes, grads32, [&](int64_t begin, int64_t end,
                                                      const std::vector<float*>& z_block) {
    std::vector<float> scratch(
        (double_softmax || kDistill || exponents.any_gce()) && compute_grad ? C : 0);
    for (int64_t i = begin; i < end; ++i) {
      float* z = z_block[0] + (i - begin) * C;
      const float f = sf * x.inv[i];
      const float m = scale_and_max(z, C, f, t.inv.data());
      if constexpr (kDistill) {
        float* z0 = z_block[1] + (i - begin) * C;
        const float m0 = scale_and_max(z0, C, f, t0.inv.data());
        // The distillation term reads z before the task loss overwrites it with its gradient.
        kl_loss[i] = distillation_row(z, z0, C, m, m0, tau, compute_grad, scratch.data());
      }
      task_loss[i] = loss_row(z, C, m, targets.row(i), targets.kind, double_softmax,
                              compute_grad, scratch.data(), exponents.at(i));
    }
    if (compute_grad && !direct) {
      for (size_t k = 0; k < classes.size(); ++k) {
        grads[k].narrow(0, begin, end - begin)
            .copy_(at::from_blob(z_block[k], {end - begin, C}, options));
      }
    }
  });
  out.grad_task = grads[0];
  out.grad_kl = kDistill ? grads[1] : at::empty({0}, image_features.options());
  return out;
}

std::tuple<at::Tensor, at::Tensor> clip_cross_entropy_forward(
    const at::Tensor& image_features, const at::Tensor& text_features, const at::Tensor& labels,
    const at::Tensor& scale, const std::optional<at::Tensor>& soft_labels,
    const std::optional<at::Tensor>& sample_index, double smoothing, bool double_softmax,
    bool normalize, bool compute_grad, double q, const std::optional<at::Tensor>& q_rows) {
  ForwardResult r = clip_loss_forward<false>(image_features, text_features, nullptr, labels, scale,
                                             soft_labels, sample_index, smoothing, double_softmax,
                                             normalize, 1.0, compute_grad, q, q_rows);
  return {r.task_rows, r.grad_task};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prograd_losses_forward(
    const at::Tensor& image_features, const at::Tensor& text_features,
    const at::Tensor& zeroshot_text_features, const at::Tensor& labels, const at::Tensor& scale,
    const std::optional<at::Tensor>& soft_labels, const std::optional<at::Tensor>& sample_index,
    double smoothing, bool double_softmax, double temperature, bool compute_grad, double q,
    const std::optional<at::Tensor>& q_rows) {
  TORCH_CHECK(zeroshot_text_features.sizes() == text_features.sizes() &&
                  zeroshot_text_features.scalar_type() == text_features.scalar_type(),
              "zeroshot_text_features: expected the shape and dtype of text_features");
  TORCH_CHECK(temperature > 0.0, "temperature: must be positive");
  ForwardResult r = clip_loss_forward<true>(image_features, text_features, &zeroshot_text_features,
                                            labels, scale, soft_labels, sample_index, smoothing,
                                            double_softmax, true, temperature, compute_grad, q,
                                            q_rows);
  return {r.task_rows, r.kl_rows, r.grad_task, r.grad_kl};
}

} // namespace

// The schemas are defined once, in Python (fastprompt/ops); this registers the CPU kernels.
TORCH_LIBRARY_IMPL(fastprompt, CPU, m) {
  m.impl("clip_cross_entropy_forward", &clip_cross_entropy_forward);
  m.impl("prograd_losses_forward", &prograd_losses_forward);
}

} // namespace fastprompt
