// The public C++ functions of the GPTQ ops: thin calls through the dispatcher.
#include "torchquant/gptq.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/accumulate.h>

#include <tuple>

namespace torchquant {

int64_t gptq_accumulate_hessian(at::Tensor& hessian, const at::Tensor& inputs, int64_t num_seen) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchquant::gptq_accumulate_hessian", "")
                       .typed<void(at::Tensor&, const at::Tensor&, int64_t)>();
  op.call(hessian, inputs, num_seen);
  // The op accepted inputs of shape [..., in]: its rows are the leading dims.
  const auto sizes = inputs.sizes();
  return num_seen + c10::multiply_integers(sizes.begin(), sizes.end() - 1);
}

GPTQResult gptq_quantize(const at::Tensor& weight, const at::Tensor& hessian, int64_t quant_min,
                         int64_t quant_max, bool symmetric, const GPTQOptions& o) {
  using T = at::Tensor;
  using Outputs = std::tuple<T, T, T, T, T, T, T>;
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torchquant::gptq_quantize", "")
          .typed<Outputs(const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool,
                         std::optional<int64_t>, bool, bool, int64_t, double, int64_t, double,
                         bool, c10::string_view)>();
  auto [weight_q, codes, scales, zero_points, g_idx, loss, damp] =
      op.call(weight, hessian, quant_min, quant_max, symmetric, o.group_size, o.act_order,
              o.static_groups, o.block_size, o.percdamp, o.clip_search_steps, o.clip_max_shrink,
              o.rtn_fallback, o.layer_name);
  return GPTQResult{weight_q, codes, scales, zero_points, g_idx, loss, damp};
}

}  // namespace torchquant
