// Autograd of the run-time linear ops, in C++ at the Autograd key (as
// csrc/autograd.cpp does for fake_quantize), so a frozen quantized layer can
// sit inside a training graph in LibTorch and Python alike. The input gets
// dy W computed from the packed weight by quantized_linear_grad_input; the
// bias gets dy summed; the weight's tensors (packed, scales, zeros, lut) get
// none: they are frozen. The backward is made only of torchquant and ATen
// ops, so torch.compile traces it.
#include "torchquant/runtime.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace torchquant {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// dy [..., N] summed over the leading dims, in the bias's dtype.
at::Tensor bias_grad(const at::Tensor& dy, const at::Tensor& bias) {
  // Leading dims by count only: sizes() on a traced tensor would specialise every dim.
  std::vector<int64_t> leading(static_cast<size_t>(std::max<int64_t>(dy.dim() - 1, 0)));
  for (size_t d = 0; d < leading.size(); ++d) leading[d] = static_cast<int64_t>(d);
  return dy.sum(leading, /*keepdim=*/false, at::kFloat).to(bias.scalar_type());
}

at::Tensor optional_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

std::optional<at::Tensor> undefined_to_nullopt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// needs_input_grad counts only the tensor arguments that are present: the
// edge of the bias comes after `tensors_before` tensors and the optional ones
// given before it.
int64_t bias_edge(std::initializer_list<std::optional<at::Tensor>> optional_before,
                  int64_t tensors_before) {
  int64_t edge = tensors_before;
  for (const auto& t : optional_before) edge += (t.has_value() && t->defined()) ? 1 : 0;
  return edge;
}

class QuantizedLinearFunction : public torch::autograd::Function<QuantizedLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& packed, const at::Tensor& scales,
                            const at::Tensor& zeros, int64_t bits, int64_t in_features,
                            const std::optional<at::Tensor>& lut,
                            const std::optional<at::Tensor>& perm,
                            const std::optional<at::Tensor>& bias) {
    ctx->save_for_backward({packed, scales, zeros, optional_or_undefined(lut),
                            optional_or_undefined(perm), optional_or_undefined(bias)});
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["in_features"] = in_features;
    ctx->saved_data["bias_edge"] = bias_edge({lut, perm}, 4);
    at::AutoDispatchBelowADInplaceOrView guard;
    return torchquant::quantized_linear(input, packed, scales, zeros, bits, in_features, lut,
                                        perm, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& dy = grad_outputs[0];
    at::Tensor dx, dbias;
    if (ctx->needs_input_grad(0)) {
      dx = torchquant::quantized_linear_grad_input(
          dy, saved[0], saved[1], saved[2], ctx->saved_data["bits"].toInt(),
          ctx->saved_data["in_features"].toInt(), undefined_to_nullopt(saved[3]),
          undefined_to_nullopt(saved[4]));
    }
    if (saved[5].defined() && ctx->needs_input_grad(ctx->saved_data["bias_edge"].toInt()))
      dbias = bias_grad(dy, saved[5]);
    return {dx,          at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), dbias};
  }
};

class W8A8LinearFunction : public torch::autograd::Function<W8A8LinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& packed, const at::Tensor& scales,
                            const std::optional<at::Tensor>& input_scale,
                            const std::optional<at::Tensor>& bias, double outlier_threshold) {
    ctx->save_for_backward({packed, scales, optional_or_undefined(bias)});
    // sym_size + guard: specialises K (fixed by the weight) but not the batch dims, which
    // size(-1) would (it reads every size of a traced tensor).
    ctx->saved_data["in_features"] = input.sym_size(-1).guard_int(__FILE__, __LINE__);
    ctx->saved_data["bias_edge"] = bias_edge({input_scale}, 3);
    at::AutoDispatchBelowADInplaceOrView guard;
    return torchquant::w8a8_linear(input, packed, scales, input_scale, bias, outlier_threshold);
  }

  // Straight-through: the activation rounding is treated as the identity, so
  // dx = dy W with W = (u - 128) * scales, the 8-bit weight with zero point 128.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& dy = grad_outputs[0];
    const at::Tensor& scales = saved[1];
    at::Tensor dx, dbias;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor zeros = at::full_symint({scales.sym_size(0), 1}, 128.0, scales.options());
      dx = torchquant::quantized_linear_grad_input(dy, saved[0], scales, zeros, /*bits=*/8,
                                                   ctx->saved_data["in_features"].toInt());
    }
    if (saved[2].defined() && ctx->needs_input_grad(ctx->saved_data["bias_edge"].toInt()))
      dbias = bias_grad(dy, saved[2]);
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), dbias, at::Tensor()};
  }
};

at::Tensor quantized_linear_autograd(const at::Tensor& input, const at::Tensor& packed,
                                     const at::Tensor& scales, const at::Tensor& zeros,
                                     int64_t bits, int64_t in_features,
                                     const std::optional<at::Tensor>& lut,
                                     const std::optional<at::Tensor>& perm,
                                     const std::optional<at::Tensor>& bias) {
  return QuantizedLinearFunction::apply(input, packed, scales, zeros, bits, in_features, lut,
                                        perm, bias);
}

at::Tensor w8a8_linear_autograd(const at::Tensor& input, const at::Tensor& packed,
                                const at::Tensor& scales,
                                const std::optional<at::Tensor>& input_scale,
                                const std::optional<at::Tensor>& bias,
                                double outlier_threshold) {
  return W8A8LinearFunction::apply(input, packed, scales, input_scale, bias, outlier_threshold);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchquant, Autograd, m) {
  m.impl("quantized_linear", &quantized_linear_autograd);
  m.impl("w8a8_linear", &w8a8_linear_autograd);
}

}  // namespace torchquant
