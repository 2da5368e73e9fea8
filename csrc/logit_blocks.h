// The forward's product schedule: raw logits X Fᵀ a block of rows at a time (or straight into the
// gradient outputs), handed to the row passes while the block is in cache.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace fastprompt {

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
//   multithreaded BLAS product per class matrix into it, then the row passes (per-block products
//   measured slower: they lose more than the row passes gain from the cache).
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

} // namespace fastprompt
