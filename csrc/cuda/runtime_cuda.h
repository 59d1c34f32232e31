// CUDA kernels of the run-time linear ops (csrc/runtime). Host-only
// declarations, so that the registration file compiles with the ordinary C++
// compiler.
#pragma once

#include "../runtime/linear_ops.h"

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torchquant::cuda {

// The QuantLinearKernels contract of linear_ops.h (x [M, Kp] float32 zero
// padded, y [M, N] float32). Small M runs the GEMV kernel, which reads the
// packed weight once and decodes it in registers; large M (or a group size
// that is not a multiple of 16) dequantizes panels of rows and multiplies them
// with cuBLAS (quantized_linear.cu).
void quantized_linear_kernel(const PackedWeight& w, const at::Tensor& x, const at::Tensor& bias,
                             at::Tensor& y);

// dx [M, Kp] = dy [M, N] W, panel by panel.
void quantized_linear_grad_input_kernel(const PackedWeight& w, const at::Tensor& dy,
                                        at::Tensor& dx);

// Small M: y float32 [M, N] = x W^T (+ bias) by the GEMV kernel
// (quantized_gemv.cu). Needs M <= kGemvMaxRows, group_size % 16 == 0, x and
// packed 16-byte aligned.
constexpr int64_t kGemvMaxRows = 16;
void quantized_gemv(const PackedWeight& w, const at::Tensor& x, const at::Tensor& bias,
                    at::Tensor& y);

// out float32 [rows, Kp] = rows [row0, row0 + rows) of W, columns >= K zero
// (quantized_linear.cu).
void dequantize_rows(const PackedWeight& w, int64_t row0, int64_t rows, at::Tensor& out);

// The dequantize_weight op on CUDA: the kernel of dequantize_rows over all rows.
at::Tensor dequantize_weight(const at::Tensor& packed, const at::Tensor& scales,
                             const at::Tensor& zeros, int64_t bits, int64_t in_features,
                             const std::optional<at::Tensor>& lut);

// The whole w8a8_linear op on CUDA (w8a8_linear.cu).
at::Tensor w8a8_linear(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& scales,
                       const std::optional<at::Tensor>& input_scale,
                       const std::optional<at::Tensor>& bias, double outlier_threshold);

std::tuple<at::Tensor, at::Tensor> lut_quantize(const at::Tensor& x, const at::Tensor& lut,
                                                int64_t block_size);

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, int64_t bits);

at::Tensor lut_dequantize(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& lut,
                          int64_t block_size);

}  // namespace torchquant::cuda
