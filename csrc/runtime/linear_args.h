// Argument checks of every run-time op (pack / unpack / dequantize, the
// weight-only linear ops and W8A8), in one place so that each bad argument
// gets the same TypeError / ValueError, naming the op and the argument, on
// every backend. The checks read only metadata (dtype, device, shape), except
// the ones a backend asks for explicitly because its values live on the host.
#pragma once

#include "packed_layout.h"

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <optional>
#include <string>

namespace torchquant {

// "[2, 3]": a shape as the error messages print it.
std::string shape_str(at::IntArrayRef sizes);

// A checked low-bit weight: W[n, k] = (v(u[n, k]) - zeros[n, k / g]) * scales[n, k / g].
struct PackedWeight {
  at::Tensor packed;  // uint8 [N, packed_row_bytes(K, bits)], contiguous
  at::Tensor scales;  // float32 [N, G], contiguous
  at::Tensor zeros;   // float32 [N, G], contiguous
  at::Tensor lut;     // float32 [16], contiguous; undefined for integer codes
  int64_t bits = 0;
  int64_t in_features = 0;   // K
  int64_t out_features = 0;  // N
  int64_t groups = 0;        // G
  int64_t group_size = 0;    // g = K / G

  int64_t row_bytes() const { return layout::packed_row_bytes(in_features, bits); }
  // K rounded up to whole chunks: the width of a decoded row, and of the
  // zero-padded activations the kernels read (so chunks never need tails).
  int64_t padded_in_features() const {
    return layout::num_chunks(in_features, bits) * layout::chunk_codes(bits);
  }
};

// bits in {2, 3, 4, 8}.
void check_bits(const char* op, int64_t bits);

// `t` (argument `name`) is on `device`: a meta tensor mixed with real ones is
// rejected here too, before any kernel sees it.
void check_device(const char* op, const char* name, const at::Tensor& t, c10::Device device);

// packed / scales / zeros / lut, all on `device`.
PackedWeight check_packed_weight(const char* op, const at::Tensor& packed,
                                 const at::Tensor& scales, const at::Tensor& zeros,
                                 int64_t bits, int64_t in_features,
                                 const std::optional<at::Tensor>& lut, c10::Device device);

// `x` (argument `name`) is a float32 / float16 / bfloat16 tensor [..., last_dim].
void check_activation(const char* op, const char* name, const at::Tensor& x, int64_t last_dim,
                      const char* last_dim_name);

// perm: int64 [K] on `device`; with `check_values` (host memory) also a
// permutation of 0..K-1. Returns it contiguous.
at::Tensor check_perm(const char* op, const at::Tensor& perm, int64_t in_features,
                      c10::Device device, bool check_values);

// bias: a float tensor [N] on `device`. Returns it as float32, contiguous.
at::Tensor check_bias(const char* op, const at::Tensor& bias, int64_t out_features,
                      c10::Device device);

// codes [N, K] of any integer dtype (pack_weight); with `check_values` (host
// memory) every code must lie in [0, 2^bits).
void check_codes(const char* op, const at::Tensor& codes, int64_t bits, bool check_values);

// packed uint8 [N, packed_row_bytes(in_features, bits)] (unpack_weight).
void check_packed(const char* op, const at::Tensor& packed, int64_t bits, int64_t in_features);

// W8A8: the checked arguments of w8a8_linear.
struct W8A8Args {
  at::Tensor packed;       // uint8 [N, packed_row_bytes(K, 8)], contiguous
  at::Tensor scales;       // float32 [N, 1], contiguous
  at::Tensor input_scale;  // float32 [1], contiguous; undefined for per-token grids
  at::Tensor bias;         // float32 [N], contiguous; undefined without bias
  int64_t in_features = 0;   // K = input.size(-1)
  int64_t out_features = 0;  // N
  float outlier_threshold = 0.0f;  // LLM.int8() decomposition above it; 0: none
};

// input [..., K] float32 / float16 / bfloat16 and the rest on its device.
// outlier_threshold: 0, or positive and finite with per-token grids (no input_scale).
W8A8Args check_w8a8_args(const char* op, const at::Tensor& input, const at::Tensor& packed,
                         const at::Tensor& scales, const std::optional<at::Tensor>& input_scale,
                         const std::optional<at::Tensor>& bias, double outlier_threshold);

// LLM.int8()'s float part, shared by every backend: y += x[:, c] W[:, c]^T over the
// columns c flagged (nonzero) in outlier_columns (uint8 [K]), in x's dtype, with the
// 8-bit weight's columns dequantized ((u - 128) * scales). x [M, K], y [M, N].
void add_outlier_product(const W8A8Args& a, const at::Tensor& x, const at::Tensor& outlier_columns,
                         const at::Tensor& y);

}  // namespace torchquant
