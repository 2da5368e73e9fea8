// CPU kernels of fastprompt::logits_cross_entropy_forward and
// fastprompt::logits_prograd_losses_forward: the row losses of clip_loss_forward.cpp
// (row_losses.h, robust_losses.h) on logits the caller computed, ProGrad's distillation term a
// template switch as there.
//
// A block of rows at a time (logit_blocks.h's size, in parallel): the rows are converted to
// float32 into the gradient output itself (float32 logits with a gradient wanted) or into
// per-thread scratch, then one pass per row while it is in cache: max and finiteness check, the
// losses, and the logit gradients written over the row (copied out in the input dtype for
// half-precision logits). No N x C float32 buffer exists beyond the outputs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "logit_blocks.h"
#include "robust_losses.h"
#include "row_losses.h"
#include "targets.h"

namespace fastprompt {
namespace {

// max(z) of one row, and whether every value is finite: v - v is 0 for a finite v and NaN for
// NaN or inf, so the sum of them is 0 exactly when the row is finite (one vectorised pass).
inline float max_if_finite(const float* z, int64_t C, bool* finite) {
  float m = -std::numeric_limits<float>::infinity();
  float nonfinite = 0.0f;
#pragma omp simd reduction(max : m) reduction(+ : nonfinite)
  for (int64_t c = 0; c < C; ++c) {
    const float v = z[c];
    m = v > m ? v : m;
    nonfinite += v - v;
  }
  *finite = nonfinite == 0.0f;
  return m;
}

struct LogitsResult {
  at::Tensor task_rows, kl_rows, grad_task, grad_kl;
};

// `zeroshot` is read only when kDistill. Labels, sample indices and per-row exponents are
// checked as they are read (Targets, LossExponents), the logits' finiteness in the row pass.
template <bool kDistill>
LogitsResult logits_loss_forward(const at::Tensor& logits, const at::Tensor* zeroshot,
                                 const at::Tensor& labels,
                                 const std::optional<at::Tensor>& soft_labels,
                                 const std::optional<at::Tensor>& sample_index, double smoothing,
                                 bool double_softmax, double temperature, bool compute_grad,
                                 double q, const std::optional<at::Tensor>& q_rows) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) > 0 && logits.size(1) > 0,
              "logits: expected an N x C tensor");
  const int64_t N = logits.size(0);
  const int64_t C = logits.size(1);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == N && labels.scalar_type() == at::kLong,
              "labels: expected N int64 values");
  const Targets targets(labels, soft_labels, sample_index, smoothing, C);
  const LossExponents exponents(q, q_rows, N);
  std::vector<at::Tensor> inputs = {logits.detach().contiguous()};
  if constexpr (kDistill) inputs.push_back(zeroshot->detach().contiguous());
  const size_t K = inputs.size();
  const bool direct = compute_grad && logits.scalar_type() == at::kFloat;
  const auto f32 = logits.options().dtype(at::kFloat);
  std::vector<at::Tensor> grads(K);
  for (size_t k = 0; k < K; ++k) {
    grads[k] = compute_grad ? at::empty({N, C}, logits.options()) : at::empty({0}, logits.options());
  }
  LogitsResult out;
  out.task_rows = at::empty({N}, f32);
  out.kl_rows = at::empty({kDistill ? N : 0}, f32);
  float* task_loss = out.task_rows.data_ptr<float>();
  float* kl_loss = kDistill ? out.kl_rows.data_ptr<float>() : nullptr;
  std::vector<char> finite(N * K, 1);
  const float tau = static_cast<float>(temperature);
  const bool needs_scratch = (double_softmax || kDistill || exponents.any_gce()) && compute_grad;

  const int64_t block = logit_block_rows(N, C);
  const int64_t blocks = (N + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<at::Tensor> buffers(K);
    std::vector<float> scratch(needs_scratch ? C : 0);
    std::vector<float*> z(K);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * block;
      const int64_t rows = std::min(block, N - r0);
      for (size_t k = 0; k < K; ++k) {
        at::Tensor dst;
        if (direct) {
          dst = grads[k].narrow(0, r0, rows);
        } else {
          if (!buffers[k].defined()) buffers[k] = at::empty({block, C}, f32);
          dst = buffers[k].narrow(0, 0, rows);
        }
        dst.copy_(inputs[k].narrow(0, r0, rows)); // float32, converted if need be
        z[k] = dst.data_ptr<float>();
      }
      for (int64_t i = r0; i < r0 + rows; ++i) {
        float* zi = z[0] + (i - r0) * C;
        bool ok = true;
        const float m = max_if_finite(zi, C, &ok);
        finite[i * K] = ok;
        if constexpr (kDistill) {
          float* z0 = z[1] + (i - r0) * C;
          const float m0 = max_if_finite(z0, C, &ok);
          finite[i * K + 1] = ok;
          // The distillation term reads z before the task loss overwrites it with its gradient.
          kl_loss[i] = distillation_row(zi, z0, C, m, m0, tau, compute_grad, scratch.data());
        }
        task_loss[i] = loss_row(zi, C, m, targets.row(i), targets.kind, double_softmax,
                                compute_grad, scratch.data(), exponents.at(i));
      }
      if (compute_grad && !direct) {
        for (size_t k = 0; k < K; ++k) {
          grads[k].narrow(0, r0, rows).copy_(buffers[k].narrow(0, 0, rows));
        }
      }
    }
  });
  const char* names[] = {"logits", "zeroshot_logits"};
  for (size_t k = 0; k < K; ++k) {
    bool all = true;
    for (int64_t i = 0; i < N; ++i) all = all && finite[i * K + k];
    TORCH_CHECK_VALUE(all, names[k], ": contains NaN or infinite values");
  }
  out.grad_task = grads[0];
  out.grad_kl = kDistill ? grads[1] : at::empty({0}, logits.options());
  return out;
}

std::tuple<at::Tensor, at::Tensor> logits_cross_entropy_forward(
    const at::Tensor& logits, const at::Tensor& labels,
    const std::optional<at::Tensor>& soft_labels, const std::optional<at::Tensor>& sample_index,
    double smoothing, bool double_softmax, bool compute_grad, double q,
    const std::optional<at::Tensor>& q_rows) {
  LogitsResult r = logits_loss_forward<false>(logits, nullptr, labels, soft_labels, sample_index,
                                              smoothing, double_softmax, 1.0, compute_grad, q,
                                              q_rows);
  return {r.task_rows, r.grad_task};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logits_prograd_losses_forward(
    const at::Tensor& logits, const at::Tensor& zeroshot_logits, const at::Tensor& labels,
    const std::optional<at::Tensor>& soft_labels, const std::optional<at::Tensor>& sample_index,
    double smoothing, bool double_softmax, double temperature, bool compute_grad, double q,
    const std::optional<at::Tensor>& q_rows) {
  TORCH_CHECK(zeroshot_logits.sizes() == logits.sizes() &&
                  zeroshot_logits.scalar_type() == logits.scalar_type(),
              "zeroshot_logits: expected the shape and dtype of logits");
  TORCH_CHECK(temperature > 0.0, "temperature: must be positive");
  LogitsResult r = logits_loss_forward<true>(logits, &zeroshot_logits, labels, soft_labels,
                                             sample_index, smoothing, double_softmax, temperature,
                                             compute_grad, q, q_rows);
  return {r.task_rows, r.kl_rows, r.grad_task, r.grad_kl};
}

} // namespace

// The schemas are defined once, in Python (fastprompt/ops); this registers the CPU kernels.
TORCH_LIBRARY_IMPL(fastprompt, CPU, m) {
  m.impl("logits_cross_entropy_forward", &logits_cross_entropy_forward);
  m.impl("logits_prograd_losses_forward", &logits_prograd_losses_forward);
}

} // namespace fastprompt
