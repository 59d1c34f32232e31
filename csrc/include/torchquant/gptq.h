// Public C++ API of torchquant's GPTQ ops (Frantar et al. 2022) for LibTorch
// users: calibrate a layer's Hessian from its inputs, then quantize its
// weight with error feedback. Calls go through the dispatcher, so any device
// with ATen works.
//
//   at::Tensor h = at::zeros({in, in});
//   int64_t seen = 0;
//   for (const auto& x : batches) seen = torchquant::gptq_accumulate_hessian(h, x, seen);
//   torchquant::GPTQOptions opt;
//   opt.group_size = 128;
//   auto r = torchquant::gptq_quantize(w, h, -8, 7, /*symmetric=*/true, opt);
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace torchquant {

// hessian ([in, in] float32) <- hessian * num_seen / (num_seen + n)
//                               + 2 / (num_seen + n) * X^T X,
// X = inputs ([..., in], any float dtype) viewed as [n, in] in float32.
// Returns num_seen + n. NaN or Inf in inputs is an error.
int64_t gptq_accumulate_hessian(at::Tensor& hessian, const at::Tensor& inputs, int64_t num_seen);

struct GPTQOptions {
  // Columns per grid (must divide in_features); nullopt: one grid per row.
  std::optional<int64_t> group_size = std::nullopt;
  // Process columns by decreasing Hessian diagonal.
  bool act_order = false;
  // All group grids from the original weights before any error feedback
  // (needs group_size).
  bool static_groups = false;
  // Columns per lazy-update block.
  int64_t block_size = 128;
  // Damping added to the Hessian diagonal, as a fraction of its mean; grown
  // 10x per failed Cholesky factorization up to 1x the mean.
  double percdamp = 0.01;
  // 0: min/max grids; > 0: MSE search over that many shrunk ranges, down to
  // (1 - clip_max_shrink) of the range.
  int64_t clip_search_steps = 0;
  double clip_max_shrink = 0.8;
  // Round to nearest (with a warning, damp = -1) instead of failing when the
  // Hessian cannot be factorized.
  bool rtn_fallback = false;
  // Named in errors and warnings.
  std::string layer_name;
};

struct GPTQResult {
  at::Tensor weight_q;     // [out, in], weight's dtype: dequantized weights
  at::Tensor codes;        // [out, in] int32 in [quant_min, quant_max], original column order
  at::Tensor scales;       // [out, n_groups] float32
  at::Tensor zero_points;  // [out, n_groups] float32, integer values in the code domain
  at::Tensor g_idx;        // [in] int32: the group of each input column
  at::Tensor loss;         // 0-d float32: tr((W - Q) H (W - Q)^T) / 2, undamped H
  at::Tensor damp;         // 0-d float32: the damping used, -1 after a round-to-nearest fallback
};

// GPTQ of weight ([out, in], float32/16/bf16) against hessian ([in, in]
// float32, symmetric positive semi-definite; not modified). weight_q ==
// (codes - zero_points[:, g_idx]) * scales[:, g_idx], exactly.
GPTQResult gptq_quantize(const at::Tensor& weight, const at::Tensor& hessian, int64_t quant_min,
                         int64_t quant_max, bool symmetric,
                         const GPTQOptions& options = GPTQOptions());

}  // namespace torchquant
