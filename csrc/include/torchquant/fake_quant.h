// Public C++ API of torchquant's fake-quantize ops for LibTorch users.
//
// Each function calls the registered operator through the dispatcher, so the
// CPU or CUDA kernel is chosen by the input's device and autograd records the
// op: backward() gives the straight-through gradient of `input` and, when
// `scale` / `zero_point` require grad, their LSQ / LSQ+ gradients.
//
//   auto y = torchquant::fake_quantize(x, scale, zero_point, -128, 127);
//   auto y = torchquant::fake_quantize(w, scale, zp, -8, 7, /*axis=*/0);
//   auto y = torchquant::fake_quantize(w, scale, zp, -8, 7, std::nullopt, /*group_size=*/128);
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torchquant {

// x^ = (clamp(round(x / scale) + zp, quant_min, quant_max) - zp) * scale,
// with one (scale, zp) per tensor, per channel along `axis`, or per group of
// `group_size` consecutive elements of the last dimension. `grad_factor`
// multiplies the scale and zero-point gradients (LSQ's gradient scale).
at::Tensor fake_quantize(
    const at::Tensor& input,
    const at::Tensor& scale,
    const at::Tensor& zero_point,
    int64_t quant_min,
    int64_t quant_max,
    std::optional<int64_t> axis = std::nullopt,
    std::optional<int64_t> group_size = std::nullopt,
    double grad_factor = 1.0);

// Straight-through gradient of the input.
at::Tensor fake_quantize_backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& scale,
    const at::Tensor& zero_point,
    int64_t quant_min,
    int64_t quant_max,
    std::optional<int64_t> axis = std::nullopt,
    std::optional<int64_t> group_size = std::nullopt);

// Gradients of input, scale and zero-point in one pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_learnable_backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& scale,
    const at::Tensor& zero_point,
    int64_t quant_min,
    int64_t quant_max,
    std::optional<int64_t> axis = std::nullopt,
    std::optional<int64_t> group_size = std::nullopt,
    double grad_factor = 1.0);

}  // namespace torchquant
