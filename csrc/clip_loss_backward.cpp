// CPU kernel of fastprompt::clip_cross_entropy_backward (also ProGrad's losses' backward): products
// on the saved logit gradient G only, never forming diag(grad_rows) G; half-precision G is
// converted to float32 a block of rows at a time (docs/kernels.md).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "operands.h"

namespace fastprompt {
namespace {

// Rows per block of the backward's Gᵀ X̂ product: large enough for BLAS to run at full speed.
constexpr int64_t kBackwardRowBlock = 1024;

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
  // x̂_i = x_i * inv_x_i (inv = 1 without normalize, or for a matrix normalised into a copy).
  const FeatureRows xr = feature_rows(as_float(image_features).detach(), normalize);
  const FeatureRows tr = feature_rows(as_float(text_features).detach(), normalize);
  const at::Tensor& x = xr.rows;
  const at::Tensor& t = tr.rows;
  const std::vector<float>& inv_x = xr.inv;
  const std::vector<float>& inv_t = tr.inv;
  // 1/||row|| of the inputs themselves: the gradients' outer factor.
  const float* norm_x = xr.inv_norm.data();
  const float* norm_t = tr.inv_norm.data();
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
        const float f = sf * norm_t[c];
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
        const float f = sf * norm_x[i] * gr[i];
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

// The schema is defined once, in Python (fastprompt/ops); this registers the CPU kernel.
TORCH_LIBRARY_IMPL(fastprompt, CPU, m) {
  m.impl("clip_cross_entropy_backward", &clip_cross_entropy_backward);
}

} // namespace fastprompt
