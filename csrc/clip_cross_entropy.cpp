// CPU kernels of fastprompt_cpp::clip_cross_entropy_{forward,backward}.
//
// Forward: one BLAS product for the raw logits X Tᵀ, then one pass per row while it is in cache:
// scale by s/(||x_i|| ||t_c||) (no normalised copy of either matrix), max, log-sum-exp, the
// double softmax statistics, the target terms, the loss, and the logit gradient written over the
// logits. With a float32 gradient wanted the product goes straight into that output (the only
// N x C buffer); otherwise (inference, half precision) a block of rows at a time into per-thread
// scratch (for_each_logit_block).
// Backward: products on the saved logit gradient G only, never forming diag(grad_rows) G; half
// precision G is converted to float32 a block of rows at a time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "clip_features.h"
#include "softmax_rows.h"

namespace fastprompt_cpp {
namespace {

// Rows per block of the backward's Gᵀ X̂ product: large enough for BLAS to run at full speed.
constexpr int64_t kBackwardRowBlock = 1024;

std::tuple<at::Tensor, at::Tensor> clip_cross_entropy_forward(
    const at::Tensor& image_features, const at::Tensor& text_features, const at::Tensor& labels,
    const at::Tensor& scale, const std::optional<at::Tensor>& soft_labels,
    const std::optional<at::Tensor>& sample_index, double smoothing, bool double_softmax,
    bool normalize, bool compute_grad) {
  check_features(image_features, text_features, labels);
  const int64_t N = image_features.size(0);
  const int64_t C = text_features.size(0);
  const double s = read_scale(scale);

  const at::Tensor x = as_float(image_features);
  const at::Tensor t = as_float(text_features);
  // The features' value checks (finite, no zero row) happen in this pass; see inv_row_norms.
  const std::vector<float> inv_x = inv_row_norms(x, normalize, "image_features");
  const std::vector<float> inv_t = inv_row_norms(t, normalize, "text_features");
  at::Tensor loss_rows = at::empty({N}, x.options());
  const Targets targets(labels, soft_labels, sample_index, smoothing, C);
  // float32 input with a gradient wanted: the product is written into the output and turned into
  // the gradient in place. Otherwise it goes to per-thread scratch (half inputs: the gradient is
  // converted a block at a time into the half-precision output).
  const at::ScalarType dtype = image_features.scalar_type();
  at::Tensor grad32 = compute_grad && dtype == at::kFloat ? at::empty({N, C}, x.options())
                                                          : at::Tensor();
  at::Tensor grad_logits = !compute_grad          ? at::empty({0}, image_features.options())
                           : grad32.defined()     ? grad32
                                                  : at::empty({N, C}, image_features.options());
  const float sf = static_cast<float>(s);
  float* loss = loss_rows.data_ptr<float>();
  for_each_logit_block(x, {t}, {grad32}, [&](int64_t begin, int64_t end,
                                              const std::vector<float*>& z_block) {
    std::vector<float> scratch(double_softmax && compute_grad ? C : 0);
    for (int64_t i = begin; i < end; ++i) {
      float* z = z_block[0] + (i - begin) * C;
      const float m = scale_and_max(z, C, sf * inv_x[i], inv_t.data());
      loss[i] = task_loss_row(z, C, m, targets.row(i), targets.kind, double_softmax,
                              compute_grad, scratch.data());
    }
    if (compute_grad && !grad32.defined()) {
      grad_logits.narrow(0, begin, end - begin)
          .copy_(at::from_blob(z_block[0], {end - begin, C}, x.options()));
    }
  });
  return {loss_rows, grad_logits};
}

// With normalize: grad_text_c = s (A_c - (A_c . t̂_c) t̂_c) / ||t_c||, A = Gᵀ X̂, and likewise for
// the images with B = G T̂; grad_scale = sum_c A_c . t̂_c. Without: s A, s B and sum_c A_c . t_c.
std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_cross_entropy_backward(
    const at::Tensor& grad_rows, const at::Tensor& grad_logits, const at::Tensor& image_features,
    const at::Tensor& text_features, const at::Tensor& scale, bool normalize, bool need_image_grad,
    bool need_text_grad, bool need_scale_grad) {
  const int64_t N = image_features.size(0);
  const int64_t C = text_features.size(0);
  const int64_t D = image_features.size(1);
  TORCH_CHECK(grad_logits.dim() == 2 && grad_logits.size(0) == N && grad_logits.size(1) == C,
              "grad_logits: expected N x C (the forward ran without compute_grad?)");
  TORCH_CHECK(grad_rows.numel() == N, "grad_rows: expected N values");
  const double s = read_scale(scale);
  const at::ScalarType dtype = image_features.scalar_type();
  // Detached: the out= products below refuse inputs that still carry requires_grad.
  const at::Tensor g_in = grad_logits.detach().contiguous();
  const at::Tensor upstream = as_float(grad_rows);
  const at::Tensor x = as_float(image_features).detach();
  const at::Tensor t = as_float(text_features).detach();
  // 1/||row|| (ones without normalize), so x̂_i = x_i * inv_x_i.
  const std::vector<float> inv_x = inv_row_norms(x, normalize);
  const std::vector<float> inv_t = inv_row_norms(t, normalize);
  const float* gr = upstream.data_ptr<float>();
  const float* ixn = inv_x.data();
  const float* itn = inv_t.data();
  const float* xp = x.data_ptr<float>();
  const float* tp = t.data_ptr<float>();
  const float sf = static_cast<float>(s);
  const int64_t block = std::min(kBackwardRowBlock, N);
  // A block of G in float32: the saved buffer itself for float32, a converted copy of just that
  // block for half precision (no N x C float32 buffer).
  auto g_block = [&](int64_t r0, int64_t rows) {
    const at::Tensor b = g_in.narrow(0, r0, rows);
    return b.scalar_type() == at::kFloat ? b : b.to(at::kFloat);
  };

  at::Tensor grad_image = at::empty({0}, image_features.options());
  at::Tensor grad_text = at::empty({0}, text_features.options());
  // In the scale's own dtype (float32, or float64 for a float64 logit scale).
  at::Tensor grad_scale = at::empty({0}, scale.options());
  double scale_sum = 0.0;
  bool scale_done = false;

  if (need_text_grad || (need_scale_grad && !need_image_grad)) {
    // A = Gᵀ X̂ without forming diag(grad_rows) G: rows of X scaled by grad_rows_i / ||x_i||
    // into one reused block buffer (never N x D), one product (accumulated) per block.
    at::Tensor a = at::empty({C, D}, x.options());
    at::Tensor xw_buffer = at::empty({block, D}, x.options());
    float* xw_p = xw_buffer.data_ptr<float>();
    for (int64_t r0 = 0; r0 < N; r0 += block) {
      const int64_t rows = std::min(block, N - r0);
      at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const float w = gr[r0 + r] * ixn[r0 + r];
          const float* xi = xp + (r0 + r) * D;
          float* out = xw_p + r * D;
#pragma omp simd
          for (int64_t k = 0; k < D; ++k) out[k] = xi[k] * w;
        }
      });
      const at::Tensor g_t = g_block(r0, rows).t();
      const at::Tensor xw = xw_buffer.narrow(0, 0, rows);
      if (r0 == 0) {
        at::mm_out(a, g_t, xw);
      } else {
        a.addmm_(g_t, xw);
      }
    }
    float* ap = a.data_ptr<float>();
    std::vector<double> dots(C);
    at::parallel_for(0, C, std::max<int64_t>(1, 4096 / D), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        float* ac = ap + c * D;
        const float* tc = tp + c * D;
        const float it = itn[c];
        float dot = 0.0f; // A_c . t̂_c
#pragma omp simd reduction(+ : dot)
        for (int64_t k = 0; k < D; ++k) dot += ac[k] * tc[k];
        dot *= it;
        dots[c] = dot;
        const float f = sf * it;
        const float proj = normalize ? dot * it : 0.0f;
#pragma omp simd
        for (int64_t k = 0; k < D; ++k) ac[k] = f * (ac[k] - proj * tc[k]);
      }
    });
    for (double d : dots) scale_sum += d;
    scale_done = true;
    if (need_text_grad) grad_text = in_dtype(a, dtype);
  }

  if (need_image_grad) {
    // B = G T̂ (N x D), a block of rows at a time; the rows still lack their grad_rows factor.
    at::Tensor t_hat = t;
    if (normalize) {
      t_hat = at::empty({C, D}, t.options());
      float* th = t_hat.data_ptr<float>();
      at::parallel_for(0, C, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
#pragma omp simd
          for (int64_t k = 0; k < D; ++k) th[c * D + k] = tp[c * D + k] * itn[c];
        }
      });
    }
    at::Tensor b = at::empty({N, D}, x.options());
    for (int64_t r0 = 0; r0 < N; r0 += block) {
      const int64_t rows = std::min(block, N - r0);
      at::Tensor out = b.narrow(0, r0, rows);
      at::mm_out(out, g_block(r0, rows), t_hat);
    }
    float* bp = b.data_ptr<float>();
    std::vector<double> dots(N);
    at::parallel_for(0, N, std::max<int64_t>(1, 4096 / D), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        float* bi = bp + i * D;
        const float* xi = xp + i * D;
        const float ix = ixn[i];
        float dot = 0.0f; // B_i . x̂_i before the grad_rows scaling
#pragma omp simd reduction(+ : dot)
        for (int64_t k = 0; k < D; ++k) dot += bi[k] * xi[k];
        dot *= ix;
        dots[i] = static_cast<double>(dot) * gr[i];
        const float f = sf * ix * gr[i];
        const float proj = normalize ? dot * ix : 0.0f;
#pragma omp simd
        for (int64_t k = 0; k < D; ++k) bi[k] = f * (bi[k] - proj * xi[k]);
      }
    });
    if (!scale_done) {
      for (double d : dots) scale_sum += d;
    }
    grad_image = in_dtype(b, dtype);
  }

  if (need_scale_grad) {
    grad_scale = at::full({}, scale_sum, scale.options());
  }
  return {grad_image, grad_text, grad_scale};
}

} // namespace

TORCH_LIBRARY_FRAGMENT(fastprompt_cpp, m) {
  m.def(
      "clip_cross_entropy_forward(Tensor image_features, Tensor text_features, Tensor labels, "
      "Tensor scale, Tensor? soft_labels, Tensor? sample_index, float smoothing, "
      "bool double_softmax, bool normalize, bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "clip_cross_entropy_backward(Tensor grad_rows, Tensor grad_logits, Tensor image_features, "
      "Tensor text_features, Tensor scale, bool normalize, bool need_image_grad, "
      "bool need_text_grad, bool need_scale_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastprompt_cpp, CPU, m) {
  m.impl("clip_cross_entropy_forward", &clip_cross_entropy_forward);
  m.impl("clip_cross_entropy_backward", &clip_cross_entropy_backward);
}

} // namespace fastprompt_cpp
