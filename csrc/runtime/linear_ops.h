// The device-independent half of the weight-only run-time ops: argument
// checks, the activation layout the kernels read (float32, permuted, zero
// padded to whole chunks), output allocation and dtype conversion. A backend
// supplies only the two matrix kernels of QuantLinearKernels.
#pragma once

#include "linear_args.h"

#include <ATen/core/Tensor.h>

#include <optional>

namespace torchquant {

struct QuantLinearKernels {
  // y [M, N] float32 contiguous = x W^T (+ bias): x float32 [M, Kp] contiguous with
  // Kp = w.padded_in_features() and columns >= K zero; bias float32 [N] or undefined.
  void (*linear)(const PackedWeight& w, const at::Tensor& x, const at::Tensor& bias,
                 at::Tensor& y);
  // dx [M, Kp] float32 contiguous = dy W for dy float32 [M, N] contiguous (columns
  // >= K of dx are scratch; the caller drops them).
  void (*grad_input)(const PackedWeight& w, const at::Tensor& dy, at::Tensor& dx);
  // True where perm lives in host memory and can be checked for free.
  bool check_values_on_host;
};

at::Tensor quantized_linear_with(const QuantLinearKernels& kernels, const at::Tensor& input,
                                 const at::Tensor& packed, const at::Tensor& scales,
                                 const at::Tensor& zeros, int64_t bits, int64_t in_features,
                                 const std::optional<at::Tensor>& lut,
                                 const std::optional<at::Tensor>& perm,
                                 const std::optional<at::Tensor>& bias);

at::Tensor quantized_linear_grad_input_with(const QuantLinearKernels& kernels,
                                            const at::Tensor& grad_output,
                                            const at::Tensor& packed, const at::Tensor& scales,
                                            const at::Tensor& zeros, int64_t bits,
                                            int64_t in_features,
                                            const std::optional<at::Tensor>& lut,
                                            const std::optional<at::Tensor>& perm);

// pack_weight / unpack_weight / dequantize_weight written with ATen only, so
// every backend can register them as they are (pack_ops.cpp). `check_values`:
// the codes are in host memory and their range can be checked for free.
at::Tensor pack_weight_aten(const at::Tensor& codes, int64_t bits, bool check_values);
at::Tensor unpack_weight_aten(const at::Tensor& packed, int64_t bits, int64_t in_features);
at::Tensor dequantize_weight_aten(const at::Tensor& packed, const at::Tensor& scales,
                                  const at::Tensor& zeros, int64_t bits, int64_t in_features,
                                  const std::optional<at::Tensor>& lut);

}  // namespace torchquant
