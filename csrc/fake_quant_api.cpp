// The public C++ functions: thin calls through the dispatcher.
#include "torchquant/fake_quant.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace torchquant {

at::Tensor fake_quantize(const at::Tensor& input, const at::Tensor& scale,
                         const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                         std::optional<int64_t> axis, std::optional<int64_t> group_size,
                         double grad_factor) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchquant::fake_quantize", "")
                       .typed<decltype(fake_quantize)>();
  return op.call(input, scale, zero_point, quant_min, quant_max, axis, group_size, grad_factor);
}

at::Tensor fake_quantize_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                  const at::Tensor& scale, const at::Tensor& zero_point,
                                  int64_t quant_min, int64_t quant_max,
                                  std::optional<int64_t> axis,
                                  std::optional<int64_t> group_size) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchquant::fake_quantize_backward", "")
                       .typed<decltype(fake_quantize_backward)>();
  return op.call(grad_output, input, scale, zero_point, quant_min, quant_max, axis, group_size);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_learnable_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
    std::optional<int64_t> axis, std::optional<int64_t> group_size, double grad_factor) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchquant::fake_quantize_learnable_backward", "")
                       .typed<decltype(fake_quantize_learnable_backward)>();
  return op.call(grad_output, input, scale, zero_point, quant_min, quant_max, axis, group_size,
                 grad_factor);
}

}  // namespace torchquant
