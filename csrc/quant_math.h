// The arithmetic of affine fake quantization for one element (or one SIMD
// vector of elements). The CPU vector kernel, the CPU scalar tail and the
// CUDA kernel all instantiate these templates, so every path computes the
// same operations in the same order and gives bit-identical results.
//
// A value type T needs +, -, * and the four primitives below. For float they
// are defined here; cpu/vec_math.h adds them for at::vec::Vectorized<float>.
//
//   q   = round_half_even(x * inv_scale) + zero
//   x^  = (clamp(q, qmin, qmax) - zero) * scale
//
// `inv_scale` is 1.0f / scale computed once per channel, as PyTorch's own
// fake-quant kernels do; multiplying by it (rather than dividing by scale)
// is what makes the forward bit-identical to torch.fake_quantize_*.
// `zero` is the zero-point already rounded to an integer value.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace torchquant {

// Round half to even, as torch.round and std::nearbyint (default rounding
// mode) do.
C10_HOST_DEVICE C10_ALWAYS_INLINE float qm_round(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return std::nearbyint(v);
#endif
}

// NaN in `a` propagates (as at::vec::minimum / maximum do), so a NaN input
// gives a NaN output on every path instead of a silently clamped value.
C10_HOST_DEVICE C10_ALWAYS_INLINE float qm_min(float a, float b) { return b < a ? b : a; }
C10_HOST_DEVICE C10_ALWAYS_INLINE float qm_max(float a, float b) { return b > a ? b : a; }

// a * b + c rounded once.
C10_HOST_DEVICE C10_ALWAYS_INLINE float qm_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return fmaf(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// `cond` is the result of a comparison of T (bool for float, a lane mask for
// vectors); picks `a` where true.
C10_HOST_DEVICE C10_ALWAYS_INLINE float qm_select(bool cond, float a, float b) {
  return cond ? a : b;
}

// Per-channel constants of one quantization grid.
template <typename T>
struct QuantGrid {
  T scale;
  T inv_scale;
  T zero;
  T qmin;
  T qmax;
};

// The integer code of x before clamping (kept as a float holding an integer).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T unclamped_code(const T& x, const QuantGrid<T>& g) {
  return qm_round(x * g.inv_scale) + g.zero;
}

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T fake_quantize_value(const T& x, const QuantGrid<T>& g) {
  const T q = unclamped_code(x, g);
  return (qm_min(qm_max(q, g.qmin), g.qmax) - g.zero) * g.scale;
}

// Straight-through estimator: the gradient passes where the code was not
// clipped and is zero where it was.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T ste_grad(const T& x, const T& dy, const QuantGrid<T>& g) {
  const T q = unclamped_code(x, g);
  const T zero_v = T(0.0f);
  return qm_select(q < g.qmin, zero_v, qm_select(q > g.qmax, zero_v, dy));
}

// Gradients of x^ with respect to x, scale and zero-point (LSQ / LSQ+):
//   inside the grid:  dx = dy, dscale = dy * (x^ - x) / scale, dzero = 0
//   clipped low/high: dx = 0,  dscale = dy * (qmin|qmax - zero),
//                     dzero = -dy * scale
// The scale and zero-point terms are per element; the caller reduces them
// over each channel or group and applies grad_factor once to the sum.
template <typename T>
struct LearnableGrads {
  T dx;
  T dscale;
  T dzero;
};

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE LearnableGrads<T> learnable_grads(
    const T& x,
    const T& dy,
    const QuantGrid<T>& g) {
  const T q = unclamped_code(x, g);
  const T zero_v = T(0.0f);
  const T qc = qm_min(qm_max(q, g.qmin), g.qmax);
  // x^ - x with one rounding: x^ and x are nearly equal, so computing x^
  // first and subtracting would lose the low bits of x^ (an error of up to
  // |q| ulps of the result). Every path uses a real fused multiply-add here
  // and the build forbids the compiler from fusing anything else
  // (-ffp-contract=off, --fmad=false), so all paths round alike.
  const T in_grid_dscale = dy * qm_fma(qc - g.zero, g.scale, zero_v - x) * g.inv_scale;
  const T clipped_dscale = dy * (qc - g.zero);
  const T clipped_dzero = zero_v - dy * g.scale;
  const auto low = q < g.qmin;
  const auto high = q > g.qmax;
  LearnableGrads<T> out{
      qm_select(low, zero_v, qm_select(high, zero_v, dy)),
      qm_select(low, clipped_dscale, qm_select(high, clipped_dscale, in_grid_dscale)),
      qm_select(low, clipped_dzero, qm_select(high, clipped_dzero, zero_v))};
  return out;
}

// The grid covering [lo, hi] (widened to include 0 so that 0 is exact):
// symmetric grids put zero at code 0 and scale by max(|lo|, |hi|) over half
// the code span; asymmetric grids map lo to qmin. The same formulas as
// torchquant.nn.fake_quantize.qparams_from_range, so a searched grid and an
// observed one agree bit for bit.
C10_HOST_DEVICE C10_ALWAYS_INLINE void grid_from_range(
    float lo, float hi, float qmin, float qmax, bool symmetric, float eps,
    float* scale, float* zero) {
  lo = lo < 0.0f ? lo : 0.0f;
  hi = hi > 0.0f ? hi : 0.0f;
  if (symmetric) {
    const float amax = -lo > hi ? -lo : hi;
    const float s = amax / ((qmax - qmin) / 2.0f);
    *scale = s > eps ? s : eps;
    *zero = 0.0f;
  } else {
    const float s = (hi - lo) / (qmax - qmin);
    *scale = s > eps ? s : eps;
    const float z = qmin - qm_round(lo / *scale);
    *zero = qm_min(qm_max(z, qmin), qmax);
  }
}

// A scale is usable when it is positive and finite; the zero-point must be an
// integer (after rounding) inside [qmin, qmax]. Kernels that cannot raise an
// error (CUDA) use this to poison the output with NaN instead.
C10_HOST_DEVICE C10_ALWAYS_INLINE bool valid_scale(float s) {
  return s > 0.0f && s <= 3.402823466e+38f;
}

}  // namespace torchquant
