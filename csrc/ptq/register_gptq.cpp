// Registrations of the GPTQ ops. The ops are written in ATen (with a CPU
// kernel chosen inside for the inner loop), so one kernel at
// CompositeExplicitAutograd serves every backend. They are not
// differentiable: at the Autograd key they run below autograd, so their
// outputs never require grad (a weight that is an nn.Parameter is fine).
#include "gptq.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <string>

namespace torchquant::ptq {
namespace {

void accumulate_hessian_op(at::Tensor& hessian, const at::Tensor& inputs, int64_t num_seen) {
  gptq_accumulate_hessian(hessian, inputs, num_seen);
}

GptqOutputs gptq_quantize_op(const at::Tensor& weight, const at::Tensor& hessian, int64_t quant_min,
                             int64_t quant_max, bool symmetric, std::optional<int64_t> group_size,
                             bool act_order, bool static_groups, int64_t block_size,
                             double percdamp, int64_t clip_search_steps, double clip_max_shrink,
                             bool rtn_fallback, c10::string_view layer_name) {
  return gptq_quantize(weight, hessian, quant_min, quant_max, symmetric, group_size, act_order,
                       static_groups, block_size, percdamp, clip_search_steps, clip_max_shrink,
                       rtn_fallback, std::string(layer_name));
}

// The Autograd kernels: redispatch below autograd (ADInplaceOrView still runs,
// so the version counter of the updated Hessian moves).
void accumulate_hessian_autograd(at::Tensor& hessian, const at::Tensor& inputs, int64_t num_seen) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchquant::gptq_accumulate_hessian", "")
                       .typed<decltype(accumulate_hessian_op)>();
  at::AutoDispatchBelowAutograd guard;
  op.call(hessian, inputs, num_seen);
}

GptqOutputs gptq_quantize_autograd(const at::Tensor& weight, const at::Tensor& hessian,
                                   int64_t quant_min, int64_t quant_max, bool symmetric,
                                   std::optional<int64_t> group_size, bool act_order,
                                   bool static_groups, int64_t block_size, double percdamp,
                                   int64_t clip_search_steps, double clip_max_shrink,
                                   bool rtn_fallback, c10::string_view layer_name) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchquant::gptq_quantize", "")
                       .typed<decltype(gptq_quantize_op)>();
  at::AutoDispatchBelowAutograd guard;
  return op.call(weight, hessian, quant_min, quant_max, symmetric, group_size, act_order,
                 static_groups, block_size, percdamp, clip_search_steps, clip_max_shrink,
                 rtn_fallback, layer_name);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchquant, CompositeExplicitAutograd, m) {
  m.impl("gptq_accumulate_hessian", TORCH_FN(accumulate_hessian_op));
  m.impl("gptq_quantize", TORCH_FN(gptq_quantize_op));
}

TORCH_LIBRARY_IMPL(torchquant, Autograd, m) {
  m.impl("gptq_accumulate_hessian", TORCH_FN(accumulate_hessian_autograd));
  m.impl("gptq_quantize", TORCH_FN(gptq_quantize_autograd));
}

}  // namespace torchquant::ptq
