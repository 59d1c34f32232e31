// The public C++ functions of torchquant/smoothquant.h: calls through the
// dispatcher, so the kernel follows the tensors' device.
#include "torchquant/smoothquant.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace torchquant {

at::Tensor smoothquant_scales(const at::Tensor& act_absmax, at::TensorList weights, double alpha,
                              double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchquant::smoothquant_scales", "")
                       .typed<decltype(smoothquant_scales)>();
  return op.call(act_absmax, weights, alpha, eps);
}

void smoothquant_fold_(const at::Tensor& prev_weight, const std::optional<at::Tensor>& prev_bias,
                       at::TensorList next_weights, const at::Tensor& scales) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchquant::smoothquant_fold_", "")
                       .typed<decltype(smoothquant_fold_)>();
  op.call(prev_weight, prev_bias, next_weights, scales);
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, int64_t quant_min,
                                                      int64_t quant_max) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchquant::quantize_per_token", "")
                       .typed<decltype(quantize_per_token)>();
  return op.call(x, quant_min, quant_max);
}

}  // namespace torchquant
