// The public C++ functions of the AWQ ops: thin calls through the dispatcher.
#include "torchquant/awq.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace torchquant {

std::tuple<at::Tensor, at::Tensor> awq_search_scales(
    const at::Tensor& x, at::TensorList weights, std::optional<at::TensorList> biases,
    int64_t quant_min, int64_t quant_max, bool symmetric, int64_t group_size, int64_t grid,
    bool duo_scaling) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchquant::awq_search_scales", "")
                       .typed<decltype(awq_search_scales)>();
  return op.call(x, weights, biases, quant_min, quant_max, symmetric, group_size, grid,
                 duo_scaling);
}

std::tuple<at::Tensor, at::Tensor> awq_search_clip(
    const at::Tensor& x, const at::Tensor& weight, int64_t quant_min, int64_t quant_max,
    bool symmetric, int64_t group_size, int64_t steps, double max_shrink, int64_t max_tokens,
    int64_t out_chunk) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchquant::awq_search_clip", "")
                       .typed<decltype(awq_search_clip)>();
  return op.call(x, weight, quant_min, quant_max, symmetric, group_size, steps, max_shrink,
                 max_tokens, out_chunk);
}

}  // namespace torchquant
