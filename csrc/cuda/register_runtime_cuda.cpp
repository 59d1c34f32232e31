// CUDA registrations of the run-time ops (pack / unpack / dequantize, the
// weight-only linear ops and W8A8). Host code only: the kernels are in
// quantized_gemv.cu, quantized_linear.cu and w8a8_linear.cu.
//
// The weight-only linear ops run the device-independent bodies of
// csrc/runtime/linear_ops.h (argument checks, activation layout, output
// dtype) with the CUDA kernel table, so their behaviour matches the CPU's by
// construction. perm and pack_weight's codes live on the GPU, so their values
// are not checked (that would synchronise with the host): the metadata checks
// still apply.
#include "runtime_cuda.h"

#include "../runtime/linear_ops.h"

#include <torch/library.h>

#include <optional>

namespace torchquant::cuda {
namespace {

const QuantLinearKernels& cuda_linear_kernels() {
  static const QuantLinearKernels kernels{&quantized_linear_kernel,
                                          &quantized_linear_grad_input_kernel,
                                          /*check_values_on_host=*/false};
  return kernels;
}

at::Tensor quantized_linear_op(const at::Tensor& input, const at::Tensor& packed,
                               const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                               int64_t in_features, const std::optional<at::Tensor>& lut,
                               const std::optional<at::Tensor>& perm,
                               const std::optional<at::Tensor>& bias) {
  return quantized_linear_with(cuda_linear_kernels(), input, packed, scales, zeros, bits,
                               in_features, lut, perm, bias);
}

at::Tensor quantized_linear_grad_input_op(const at::Tensor& grad_output, const at::Tensor& packed,
                                          const at::Tensor& scales, const at::Tensor& zeros,
                                          int64_t bits, int64_t in_features,
                                          const std::optional<at::Tensor>& lut,
                                          const std::optional<at::Tensor>& perm) {
  return quantized_linear_grad_input_with(cuda_linear_kernels(), grad_output, packed, scales,
                                          zeros, bits, in_features, lut, perm);
}

// Packing runs once at load time; the ATen version serves every device.
at::Tensor pack_weight_op(const at::Tensor& codes, int64_t bits) {
  return pack_weight_aten(codes, bits, /*check_values=*/false);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchquant, CUDA, m) {
  m.impl("pack_weight", TORCH_FN(pack_weight_op));
  m.impl("unpack_weight", TORCH_FN(unpack_weight_aten));
  m.impl("dequantize_weight", TORCH_FN(cuda::dequantize_weight));
  m.impl("quantized_linear", TORCH_FN(quantized_linear_op));
  m.impl("quantized_linear_grad_input", TORCH_FN(quantized_linear_grad_input_op));
  m.impl("w8a8_linear", TORCH_FN(cuda::w8a8_linear));
  m.impl("lut_quantize", TORCH_FN(cuda::lut_quantize));
  m.impl("lut_dequantize", TORCH_FN(cuda::lut_dequantize));
  m.impl("quantize_rows", TORCH_FN(cuda::quantize_rows));
}

}  // namespace torchquant::cuda
