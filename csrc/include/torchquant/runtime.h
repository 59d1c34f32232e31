// Public C++ API of torchquant's run-time ops: linear layers that compute from
// packed low-bit weights. Each function calls the registered operator through
// the dispatcher, so it runs on the tensors' device and quantized_linear /
// w8a8_linear are differentiable with respect to their input.
//
// A low-bit weight W [N, K] is `packed` uint8 [N, packed_row_bytes(K, bits)]
// (csrc/runtime/packed_layout.h) with float32 scales / zeros [N, G]:
//     W[n, k] = (v(u) - zeros[n, k / g]) * scales[n, k / g],   g = K / G,
// v(u) = u, or lut[u] for 4-bit lookup-table codes (float32 [16], e.g. NF4).
//
//   at::Tensor packed = torchquant::pack_weight(codes, 4);    // codes [N, K] in [0, 16)
//   at::Tensor y = torchquant::quantized_linear(x, packed, scales, zeros, 4, K);
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torchquant {

// Codes [N, K] (any integer dtype, values in [0, 2^bits)) -> packed uint8.
at::Tensor pack_weight(const at::Tensor& codes, int64_t bits);

// Packed uint8 -> codes uint8 [N, in_features].
at::Tensor unpack_weight(const at::Tensor& packed, int64_t bits, int64_t in_features);

// The float32 weight [N, in_features] (for references; the linear ops never form it).
at::Tensor dequantize_weight(const at::Tensor& packed, const at::Tensor& scales,
                             const at::Tensor& zeros, int64_t bits, int64_t in_features,
                             const std::optional<at::Tensor>& lut = std::nullopt);

// y = x[..., perm] W^T + bias for x [..., in_features] float32 / float16 / bfloat16; y in
// x's dtype, math in float32. perm: int64 [in_features], the column order of an act-order
// weight repacked into group order.
at::Tensor quantized_linear(const at::Tensor& input, const at::Tensor& packed,
                            const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                            int64_t in_features,
                            const std::optional<at::Tensor>& lut = std::nullopt,
                            const std::optional<at::Tensor>& perm = std::nullopt,
                            const std::optional<at::Tensor>& bias = std::nullopt);

// dx [..., in_features] = (dy W)[..., perm^-1] for dy [..., N], in dy's dtype.
at::Tensor quantized_linear_grad_input(const at::Tensor& grad_output, const at::Tensor& packed,
                                       const at::Tensor& scales, const at::Tensor& zeros,
                                       int64_t bits, int64_t in_features,
                                       const std::optional<at::Tensor>& lut = std::nullopt,
                                       const std::optional<at::Tensor>& perm = std::nullopt);

// int8 activations (per-token dynamic grids, or one static float32 [1] input_scale) times
// 8-bit packed weights (u = q + 128) with float32 per-channel scales [N, 1]; int32
// accumulation, y = acc * s_x * s_w + bias in x's dtype. outlier_threshold > 0: LLM.int8(),
// the input columns with |x| >= outlier_threshold in any token multiplied in float.
at::Tensor w8a8_linear(const at::Tensor& input, const at::Tensor& packed,
                       const at::Tensor& scales,
                       const std::optional<at::Tensor>& input_scale = std::nullopt,
                       const std::optional<at::Tensor>& bias = std::nullopt,
                       double outlier_threshold = 0.0);

// Block-wise lookup-table codes (NF4 / FP4): codes uint8 (x's shape) of the level of lut
// (float32 [L], L <= 256) nearest to each value over its block's absmax, and the absmax
// float32 [ceil(numel / block_size)] of each block of block_size flattened values.
std::tuple<at::Tensor, at::Tensor> lut_quantize(const at::Tensor& x, const at::Tensor& lut,
                                                int64_t block_size);

// float32 lut[codes] * absmax[block]: the values lut_quantize coded.
at::Tensor lut_dequantize(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& lut,
                          int64_t block_size);

// Each row of x [R, K] on its own asymmetric min/max grid of bits in {2, 4, 8}: packed uint8
// [R, packed_row_bytes(K, bits)] and float32 scales / zeros [R, 1] (dequantize_weight reads them).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, int64_t bits);

}  // namespace torchquant
