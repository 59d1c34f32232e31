// Autograd of the fake-quantize op, in C++ at the Autograd key, so LibTorch
// users get gradients too. The forward redispatches to the backend kernel and
// the backward is made only of torchquant ops, which is what lets
// torch.compile trace both sides into its graphs.
#include "torchquant/fake_quant.h"

#include <torch/autograd.h>
#include <torch/library.h>

namespace torchquant {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class FakeQuantizeFunction : public torch::autograd::Function<FakeQuantizeFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& scale, const at::Tensor& zero_point,
                            int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis,
                            std::optional<int64_t> group_size, double grad_factor) {
    ctx->save_for_backward({input, scale, zero_point});
    ctx->saved_data["quant_min"] = quant_min;
    ctx->saved_data["quant_max"] = quant_max;
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["grad_factor"] = grad_factor;
    at::AutoDispatchBelowADInplaceOrView guard;
    return torchquant::fake_quantize(input, scale, zero_point, quant_min, quant_max, axis,
                                     group_size, grad_factor);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& scale = saved[1];
    const at::Tensor& zero_point = saved[2];
    const int64_t quant_min = ctx->saved_data["quant_min"].toInt();
    const int64_t quant_max = ctx->saved_data["quant_max"].toInt();
    const auto axis = ctx->saved_data["axis"].toOptional<int64_t>();
    const auto group_size = ctx->saved_data["group_size"].toOptional<int64_t>();
    const double grad_factor = ctx->saved_data["grad_factor"].toDouble();
    const at::Tensor& dy = grad_outputs[0];

    // The scale / zero-point reductions cost a second accumulator stream;
    // skip them when neither is being trained.
    const bool want_qparam_grads =
        ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    at::Tensor dx, dscale, dzero;
    if (want_qparam_grads) {
      std::tie(dx, dscale, dzero) = torchquant::fake_quantize_learnable_backward(
          dy, input, scale, zero_point, quant_min, quant_max, axis, group_size, grad_factor);
    } else {
      dx = torchquant::fake_quantize_backward(dy, input, scale, zero_point, quant_min,
                                              quant_max, axis, group_size);
    }
    if (!ctx->needs_input_grad(0)) dx = at::Tensor();
    if (!ctx->needs_input_grad(1)) dscale = at::Tensor();
    if (!ctx->needs_input_grad(2)) dzero = at::Tensor();
    return {dx, dscale, dzero, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor fake_quantize_autograd(const at::Tensor& input, const at::Tensor& scale,
                                  const at::Tensor& zero_point, int64_t quant_min,
                                  int64_t quant_max, std::optional<int64_t> axis,
                                  std::optional<int64_t> group_size, double grad_factor) {
  return FakeQuantizeFunction::apply(input, scale, zero_point, quant_min, quant_max, axis,
                                     group_size, grad_factor);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchquant, Autograd, m) {
  m.impl("fake_quantize", &fake_quantize_autograd);
}

}  // namespace torchquant
