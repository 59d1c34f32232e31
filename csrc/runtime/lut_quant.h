// Block-wise lookup-table quantization (NF4 / FP4 weights, the 8-bit double
// quantization of their block scales): the per-element math, shared by the
// CPU and CUDA kernels of lut_quantize / lut_dequantize so both give the same
// codes bit for bit.
//
// A value x of a block with absmax a is scaled to s = clamp(x * (1 / max(a,
// 1e-38)), -1, 1) and coded as the level nearest to s. The levels are sorted
// once (stably: equal levels keep their code order); the code is the sorted
// position p = #{midpoints < s} mapped back through the sort order, so a value
// exactly on a midpoint takes the lower level: torch.bucketize(s, midpoints)
// as bitsandbytes computes it, and the same float32 operations.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace torchquant::lut {

constexpr int kMaxLevels = 256;
// The smallest block absmax divided by: an all-zero block codes every value
// as the level nearest to 0 instead of dividing by zero.
constexpr float kMinAbsmax = 1e-38f;

// Sorted midpoints of a table and the code of each sorted position.
struct SortedLevels {
  float midpoints[kMaxLevels - 1];
  uint8_t code[kMaxLevels];
  int levels;
};

C10_HOST_DEVICE C10_ALWAYS_INLINE float inverse_absmax(float absmax) {
  return 1.0f / (absmax > kMinAbsmax ? absmax : kMinAbsmax);
}

C10_HOST_DEVICE C10_ALWAYS_INLINE uint8_t quantize_value(float x, float inv_absmax,
                                                         const SortedLevels& t) {
  float s = x * inv_absmax;
  s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
  // Lower bound over the levels - 1 midpoints: the count of midpoints < s.
  int lo = 0, hi = t.levels - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (t.midpoints[mid] < s) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return t.code[lo];
}

// Fills `t` from a table of `levels` float32 values (host code: a stable sort).
void sort_levels(const float* lut, int levels, SortedLevels* t);

}  // namespace torchquant::lut

// ---- Host side: the argument checks of both ops, shared by every backend ----------------

#include <ATen/core/Tensor.h>

namespace torchquant::lut {

// lut_quantize: x float32 / float16 / bfloat16 and finite, lut float32 [L] (2 <= L <= 256,
// finite) on x's device, block_size >= 1. Returns the table sorted for quantize_value.
SortedLevels check_quantize_args(const char* op, const at::Tensor& x, const at::Tensor& lut,
                                 int64_t block_size);

// lut_dequantize: codes uint8, absmax float32 [ceil(codes.numel() / block_size)] and lut
// float32 [L] on codes' device. With check_values (host memory), every code < L.
void check_dequantize_args(const char* op, const at::Tensor& codes, const at::Tensor& absmax,
                           const at::Tensor& lut, int64_t block_size, bool check_values);

inline int64_t num_blocks(int64_t numel, int64_t block_size) {
  return (numel + block_size - 1) / block_size;
}

}  // namespace torchquant::lut
