// Registrations of the AWQ ops. They are written in ATen (awq.cpp), so one
// kernel at CompositeExplicitAutograd serves every backend. They are
// searches, not differentiable: at the Autograd key they run below autograd,
// so their outputs never require grad (weights that are nn.Parameters are
// read as plain data).
#include "awq.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

namespace torchquant::ptq {
namespace {

std::tuple<at::Tensor, at::Tensor> search_scales_autograd(
    const at::Tensor& x, at::TensorList weights, std::optional<at::TensorList> biases,
    int64_t quant_min, int64_t quant_max, bool symmetric, int64_t group_size, int64_t grid,
    bool duo_scaling) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchquant::awq_search_scales", "")
                       .typed<decltype(awq_search_scales)>();
  at::AutoDispatchBelowAutograd guard;
  return op.call(x, weights, biases, quant_min, quant_max, symmetric, group_size, grid,
                 duo_scaling);
}

std::tuple<at::Tensor, at::Tensor> search_clip_autograd(
    const at::Tensor& x, const at::Tensor& weight, int64_t quant_min, int64_t quant_max,
    bool symmetric, int64_t group_size, int64_t steps, double max_shrink, int64_t max_tokens,
    int64_t out_chunk) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchquant::awq_search_clip", "")
                       .typed<decltype(awq_search_clip)>();
  at::AutoDispatchBelowAutograd guard;
  return op.call(x, weight, quant_min, quant_max, symmetric, group_size, steps, max_shrink,
                 max_tokens, out_chunk);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchquant, CompositeExplicitAutograd, m) {
  m.impl("awq_search_scales", TORCH_FN(awq_search_scales));
  m.impl("awq_search_clip", TORCH_FN(awq_search_clip));
}

TORCH_LIBRARY_IMPL(torchquant, Autograd, m) {
  m.impl("awq_search_scales", TORCH_FN(search_scales_autograd));
  m.impl("awq_search_clip", TORCH_FN(search_clip_autograd));
}

}  // namespace torchquant::ptq
