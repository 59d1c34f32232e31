// The device-independent half of each fake-quantize op: argument checks,
// output allocation and the final reduction of the scale / zero-point
// gradients. A backend (CPU, CUDA) supplies only the element kernels.
#pragma once

#include "fake_quant_args.h"

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torchquant {

struct FakeQuantKernels {
  // out[i] = fake_quantize_value(input[i]).
  void (*forward)(const FakeQuantArgs& args, at::Tensor& out);
  // grad_input[i] = straight-through gradient of grad_output[i].
  void (*ste_backward)(const FakeQuantArgs& args, const at::Tensor& grad_output,
                       at::Tensor& grad_input);
  // Writes grad_input and returns partial sums of the per-element scale and
  // zero-point terms, shape [2, A, channels, B]; the caller sums dims 1 and 3.
  // One pass over input and grad_output: no tensor the size of the input is
  // materialised for the reduction.
  at::Tensor (*learnable_backward)(const FakeQuantArgs& args, const at::Tensor& grad_output,
                                   at::Tensor& grad_input);
  // True where scale / zero_point live in host memory and can be checked for
  // free; a GPU backend poisons the output with NaN instead of synchronising.
  bool check_values_on_host;
};

at::Tensor fake_quantize_with(
    const FakeQuantKernels& kernels,
    const at::Tensor& input,
    const at::Tensor& scale,
    const at::Tensor& zero_point,
    int64_t quant_min,
    int64_t quant_max,
    std::optional<int64_t> axis,
    std::optional<int64_t> group_size,
    double grad_factor);

at::Tensor fake_quantize_backward_with(
    const FakeQuantKernels& kernels,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& scale,
    const at::Tensor& zero_point,
    int64_t quant_min,
    int64_t quant_max,
    std::optional<int64_t> axis,
    std::optional<int64_t> group_size);

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_learnable_backward_with(
    const FakeQuantKernels& kernels,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& scale,
    const at::Tensor& zero_point,
    int64_t quant_min,
    int64_t quant_max,
    std::optional<int64_t> axis,
    std::optional<int64_t> group_size,
    double grad_factor);

}  // namespace torchquant
