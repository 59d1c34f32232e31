// The public C++ functions of the run-time ops: thin calls through the dispatcher.
#include "torchquant/runtime.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace torchquant {
namespace {

template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

}  // namespace

at::Tensor pack_weight(const at::Tensor& codes, int64_t bits) {
  static auto op = find_op<decltype(pack_weight)>("torchquant::pack_weight");
  return op.call(codes, bits);
}

at::Tensor unpack_weight(const at::Tensor& packed, int64_t bits, int64_t in_features) {
  static auto op = find_op<decltype(unpack_weight)>("torchquant::unpack_weight");
  return op.call(packed, bits, in_features);
}

at::Tensor dequantize_weight(const at::Tensor& packed, const at::Tensor& scales,
                             const at::Tensor& zeros, int64_t bits, int64_t in_features,
                             const std::optional<at::Tensor>& lut) {
  static auto op = find_op<decltype(dequantize_weight)>("torchquant::dequantize_weight");
  return op.call(packed, scales, zeros, bits, in_features, lut);
}

at::Tensor quantized_linear(const at::Tensor& input, const at::Tensor& packed,
                            const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                            int64_t in_features, const std::optional<at::Tensor>& lut,
                            const std::optional<at::Tensor>& perm,
                            const std::optional<at::Tensor>& bias) {
  static auto op = find_op<decltype(quantized_linear)>("torchquant::quantized_linear");
  return op.call(input, packed, scales, zeros, bits, in_features, lut, perm, bias);
}

at::Tensor quantized_linear_grad_input(const at::Tensor& grad_output, const at::Tensor& packed,
                                       const at::Tensor& scales, const at::Tensor& zeros,
                                       int64_t bits, int64_t in_features,
                                       const std::optional<at::Tensor>& lut,
                                       const std::optional<at::Tensor>& perm) {
  static auto op =
      find_op<decltype(quantized_linear_grad_input)>("torchquant::quantized_linear_grad_input");
  return op.call(grad_output, packed, scales, zeros, bits, in_features, lut, perm);
}

at::Tensor w8a8_linear(const at::Tensor& input, const at::Tensor& packed,
                       const at::Tensor& scales, const std::optional<at::Tensor>& input_scale,
                       const std::optional<at::Tensor>& bias, double outlier_threshold) {
  static auto op = find_op<decltype(w8a8_linear)>("torchquant::w8a8_linear");
  return op.call(input, packed, scales, input_scale, bias, outlier_threshold);
}

std::tuple<at::Tensor, at::Tensor> lut_quantize(const at::Tensor& x, const at::Tensor& lut,
                                                int64_t block_size) {
  static auto op = find_op<decltype(lut_quantize)>("torchquant::lut_quantize");
  return op.call(x, lut, block_size);
}

at::Tensor lut_dequantize(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& lut,
                          int64_t block_size) {
  static auto op = find_op<decltype(lut_dequantize)>("torchquant::lut_dequantize");
  return op.call(codes, absmax, lut, block_size);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, int64_t bits) {
  static auto op = find_op<decltype(quantize_rows)>("torchquant::quantize_rows");
  return op.call(x, bits);
}

}  // namespace torchquant
