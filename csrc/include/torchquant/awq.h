// Public C++ API of torchquant's AWQ searches (Lin et al. 2023, arXiv
// 2306.00978) for LibTorch users. Each function calls the registered
// operator through the dispatcher; one ATen implementation serves every
// device. Neither op records autograd: they are calibration steps.
//
//   // x: [tokens, 4096] inputs of q/k/v; the scales go into the preceding norm.
//   auto [s, losses] = torchquant::awq_search_scales(x, {wq, wk, wv}, std::nullopt,
//                                                    0, 15, /*symmetric=*/false, 128);
//   // Then, per layer, on the scaled weight and the scaled inputs x / s:
//   auto [lo, hi] = torchquant::awq_search_clip(x / s, w * s, 0, 15, false, 128);
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torchquant {

// The per-input-channel scales s [in] (float32) that minimise the output
// error of the layers reading x when their weights are quantized as Q(W s)
// and their input divided by s; and the loss of every grid point (losses
// [grid], float32).
//
// x [tokens, in] and weights [out_k, in] are float32/16/bf16 and finite.
// Grid point i < grid tries alpha = i / grid and
//   s = mean|x|^alpha                                   (duo_scaling false)
//   s = mean|x|^alpha / (w_mean^(1 - alpha) + 1e-4)     (duo_scaling true),
// w_mean being the mean over all rows of all weights of |W| divided by its
// group's max |W| (+1e-6); s is clamped to >= 1e-4 and divided by
// sqrt(max(s) min(s)). Its loss is sum_k mean(((x / s) Q(W_k s)^T - x W_k^T)^2),
// Q a min/max grid per group of group_size input columns (-1: one group per
// row) on the codes [quant_min, quant_max]. alpha = 0 is s = 1: plain
// round-to-nearest (without duo scaling). Biases, if given, are checked
// against the weights; they cancel in the error.
std::tuple<at::Tensor, at::Tensor> awq_search_scales(
    const at::Tensor& x,
    at::TensorList weights,
    std::optional<at::TensorList> biases,
    int64_t quant_min,
    int64_t quant_max,
    bool symmetric,
    int64_t group_size,
    int64_t grid = 20,
    bool duo_scaling = false);

// The clipping range (min_val, max_val), each [out, in / group_size]
// float32, of every group of `weight` [out, in]: the range [f lo, f hi]
// (symmetric: lo = -max|w|, hi = max|w|; asymmetric: the group's min and
// max) for the shrink factor f = 1 - k * max_shrink / steps, k < steps,
// that minimises sum_t (x_t . (Q(clamp(w, f lo, f hi)) - w))^2 over the
// group's inputs of the sampled tokens x[::max(1, tokens / max_tokens)].
// f = 1 (no clipping) is always a candidate and wins ties. Output channels
// are searched out_chunk at a time to bound memory.
std::tuple<at::Tensor, at::Tensor> awq_search_clip(
    const at::Tensor& x,
    const at::Tensor& weight,
    int64_t quant_min,
    int64_t quant_max,
    bool symmetric,
    int64_t group_size,
    int64_t steps = 20,
    double max_shrink = 0.5,
    int64_t max_tokens = 512,
    int64_t out_chunk = 256);

}  // namespace torchquant
