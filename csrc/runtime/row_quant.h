// quantize_rows: each row of x on its own asymmetric min/max grid (KV-cache
// keys per channel and values per token). The per-row math, shared by the
// CPU and CUDA kernels, is quant_math.h's: grid_from_range for the grid and
// unclamped_code + clamp for each code, the formulas every torchquant grid uses.
#pragma once

#include "../quant_math.h"

#include <c10/macros/Macros.h>

#include <cstdint>

namespace torchquant::rows {

// The smallest scale of a row grid: a constant row still gets a usable grid.
constexpr float kMinScale = 1e-8f;

// Grid of one row from its min / max; writes scale and zero (unsigned domain).
C10_HOST_DEVICE C10_ALWAYS_INLINE QuantGrid<float> row_grid(float lo, float hi, int bits) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  float scale, zero;
  grid_from_range(lo, hi, 0.0f, qmax, /*symmetric=*/false, kMinScale, &scale, &zero);
  return QuantGrid<float>{scale, 1.0f / scale, zero, 0.0f, qmax};
}

C10_HOST_DEVICE C10_ALWAYS_INLINE uint8_t row_code(float x, const QuantGrid<float>& g) {
  return static_cast<uint8_t>(qm_min(qm_max(unclamped_code(x, g), g.qmin), g.qmax));
}

}  // namespace torchquant::rows

#include <ATen/core/Tensor.h>

namespace torchquant::rows {

// x float32 / float16 / bfloat16 [R, K] with K >= 1 and finite values (checked on
// the host by the caller where values live there); bits in {2, 4, 8}.
void check_args(const char* op, const at::Tensor& x, int64_t bits);

}  // namespace torchquant::rows
