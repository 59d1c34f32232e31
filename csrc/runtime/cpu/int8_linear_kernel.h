// The CPU kernel of the W8A8 linear op (int8 activations x int8 weights,
// int32 accumulation), declared once per instruction set. The implementation
// (int8_linear_kernel_impl.h) is compiled once per instruction set and
// register_int8_cpu.cpp picks the widest one the running CPU supports.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace torchquant::cpu::int8 {

// One call of the op, arguments already checked: x [M, K] and y [M, N]
// contiguous in `dtype`; w the 8-bit packed weight [N, w_row_bytes] (bytes
// u = q + 128, rows zero-padded to a multiple of 16), w_scales [N], bias [N]
// or null, all float32.
struct W8A8Problem {
  const void* x;
  void* y;
  c10::ScalarType dtype;
  int64_t M, K, N;
  const uint8_t* w;
  int64_t w_row_bytes;
  const float* w_scales;
  const float* bias;
  // Null: a dynamic symmetric grid per token (quantize_per_token's). Else the
  // one static activation scale (positive and finite, checked by the caller).
  const float* input_scale;
  // LLM.int8(): > 0 finds each token's grid over its values with |x| < threshold and
  // flags (sets to 1) outlier_columns[k] (uint8 [K], zeroed by the caller) for every
  // column holding a larger one; those columns' codes are zeroed before the product,
  // which the caller completes in float. 0: no decomposition.
  float outlier_threshold;
  uint8_t* outlier_columns;
};

// Computes y. Returns the number of token rows whose dynamic scale is not
// finite (x holds NaN / Inf there); y is then left unwritten and the caller
// raises. Always 0 for a static grid.
using W8A8Kernel = int64_t (*)(const W8A8Problem& p);

#define TORCHQUANT_DECLARE_INT8_KERNELS(CAPABILITY) \
  namespace CAPABILITY {                            \
  int64_t w8a8_linear(const W8A8Problem& p);        \
  }

TORCHQUANT_DECLARE_INT8_KERNELS(DEFAULT)
#if defined(TORCHQUANT_HAVE_AVX2_KERNELS)
TORCHQUANT_DECLARE_INT8_KERNELS(AVX2)
TORCHQUANT_DECLARE_INT8_KERNELS(AVX512)
#endif

#undef TORCHQUANT_DECLARE_INT8_KERNELS

}  // namespace torchquant::cpu::int8
