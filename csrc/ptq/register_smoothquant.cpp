// Registrations of the SmoothQuant ops. They are written in ATen
// (smoothquant.cpp), so one kernel at CompositeExplicitAutograd serves every
// backend; the fake kernels for torch.compile are in torchquant/ops/. They
// are not differentiable: at the Autograd key they run below autograd, so
// their outputs never require grad and smoothquant_fold_ edits the weights of
// nn.Parameters as plain data (ADInplaceOrView still runs, so their version
// counters move and a graph that saved them refuses to backpropagate).
#include "smoothquant.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace torchquant::ptq {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor scales_autograd(const at::Tensor& act_absmax, at::TensorList weights, double alpha,
                           double eps) {
  static auto op = find_op<decltype(smoothquant_scales)>("torchquant::smoothquant_scales");
  at::AutoDispatchBelowAutograd guard;
  return op.call(act_absmax, weights, alpha, eps);
}

void fold_autograd(const at::Tensor& prev_weight, const std::optional<at::Tensor>& prev_bias,
                   at::TensorList next_weights, const at::Tensor& scales) {
  static auto op = find_op<decltype(smoothquant_fold_)>("torchquant::smoothquant_fold_");
  at::AutoDispatchBelowAutograd guard;
  op.call(prev_weight, prev_bias, next_weights, scales);
}

std::tuple<at::Tensor, at::Tensor> per_token_autograd(const at::Tensor& x, int64_t quant_min,
                                                      int64_t quant_max) {
  static auto op = find_op<decltype(quantize_per_token)>("torchquant::quantize_per_token");
  at::AutoDispatchBelowAutograd guard;
  return op.call(x, quant_min, quant_max);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchquant, CompositeExplicitAutograd, m) {
  m.impl("smoothquant_scales", TORCH_FN(smoothquant_scales));
  m.impl("smoothquant_fold_", TORCH_FN(smoothquant_fold_));
  m.impl("quantize_per_token", TORCH_FN(quantize_per_token));
}

TORCH_LIBRARY_IMPL(torchquant, Autograd, m) {
  m.impl("smoothquant_scales", TORCH_FN(scales_autograd));
  m.impl("smoothquant_fold_", TORCH_FN(fold_autograd));
  m.impl("quantize_per_token", TORCH_FN(per_token_autograd));
}

}  // namespace torchquant::ptq
