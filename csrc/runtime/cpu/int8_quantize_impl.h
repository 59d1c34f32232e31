// Activation quantization of the W8A8 CPU kernel, compiled once per
// instruction set with int8_linear_kernel_impl.h: each token row of x becomes
// int8-valued codes, their sum and their scale. The grid is quant_math.h's
// (grid_from_range / unclamped_code), the formulas quantize_per_token and the
// observers use, so the codes match that op bit for bit.
#pragma once

// vec_math.h must come before quant_math.h (the templates there find the
// Vectorized overloads by ordinary lookup).
#include "../../cpu/vec_math.h"

#include "../../ptq/smoothquant.h"
#include "../../quant_math.h"
#include "int8_linear_kernel.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace torchquant::cpu::int8 {
namespace CPU_CAPABILITY {

using VecF = at::vec::Vectorized<float>;

// The codes as the dot products read them, in rows zero-padded to kCodeAlign.
#if defined(CPU_CAPABILITY_AVX512)
using Code = int8_t;  // vpdpbusd's signed operand
constexpr int64_t kCodeAlign = 64;
#else
// AVX2 has no VNNI, and vpmaddubsw would saturate (255 * -128 * 2 overflows
// int16), so both operands are widened to int16 and multiplied exactly by
// vpmaddwd: the codes once, here; the weight bytes on load.
using Code = int16_t;
constexpr int64_t kCodeAlign = 16;
#endif

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Writes the codes of one row (n values, float32) and returns their sum.
inline int32_t store_codes(const float* x, int64_t n, const QuantGrid<float>& g, Code* out) {
  int64_t k = 0;
  int32_t sum = 0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  const QuantGrid<VecF> gv{VecF(g.scale), VecF(g.inv_scale), VecF(g.zero), VecF(g.qmin),
                           VecF(g.qmax)};
#endif
#if defined(CPU_CAPABILITY_AVX512)
  __m512i sumv = _mm512_setzero_si512();
  for (; k + VecF::size() <= n; k += VecF::size()) {
    const VecF q = qm_min(qm_max(unclamped_code(VecF::loadu(x + k), gv), gv.qmin), gv.qmax);
    const __m512i qi = _mm512_cvtps_epi32(q);  // exact: q holds an integer
    sumv = _mm512_add_epi32(sumv, qi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm512_cvtepi32_epi8(qi));
  }
  sum = _mm512_reduce_add_epi32(sumv);
#elif defined(CPU_CAPABILITY_AVX2)
  __m256i sumv = _mm256_setzero_si256();
  for (; k + VecF::size() <= n; k += VecF::size()) {
    const VecF q = qm_min(qm_max(unclamped_code(VecF::loadu(x + k), gv), gv.qmin), gv.qmax);
    const __m256i qi = _mm256_cvtps_epi32(q);
    sumv = _mm256_add_epi32(sumv, qi);
    const __m128i q16 =
        _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), q16);
  }
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sumv), _mm256_extracti128_si256(sumv, 1));
  s4 = _mm_hadd_epi32(s4, s4);
  sum = _mm_cvtsi128_si32(_mm_hadd_epi32(s4, s4));
#endif
  // The scalar tail (and the whole row in the baseline build): the same
  // operations on one float.
  for (; k < n; ++k) {
    const float q = qm_min(qm_max(unclamped_code(x[k], g), g.qmin), g.qmax);
    out[k] = static_cast<Code>(static_cast<int32_t>(q));
    sum += static_cast<int32_t>(q);
  }
  return sum;
}

// LLM.int8()'s pass over one row: max |x| over the values below `threshold`
// (returned), flagging the column of every other value in `flags`; max |x|
// over all of them (NaN propagating) goes to *all_max, which screens the row.
inline float inlier_absmax(const float* x, int64_t n, float threshold, uint8_t* flags,
                           float* all_max) {
  const VecF tv(threshold);
  VecF in_max(0.0f), any_max(0.0f);
  int64_t k = 0;
  for (; k + VecF::size() <= n; k += VecF::size()) {
    const VecF a = VecF::loadu(x + k).abs();
    any_max = at::vec::maximum(any_max, a);
    const VecF outlier = a >= tv;
    in_max = at::vec::maximum(in_max, VecF::blendv(a, VecF(0.0f), outlier));
    // zero_mask: a bit per lane that compares false; all set in the common case.
    if (outlier.zero_mask() != (1 << VecF::size()) - 1) {
      for (int j = 0; j < VecF::size(); ++j) {
        if (std::abs(x[k + j]) >= threshold) flags[k + j] = 1;
      }
    }
  }
  float in_s = 0.0f, any_s = 0.0f;
  for (; k < n; ++k) {
    const float a = std::abs(x[k]);
    any_s = (std::isnan(a) || a > any_s) ? a : any_s;
    if (a >= threshold) {
      flags[k] = 1;
    } else if (a > in_s) {
      in_s = a;
    }
  }
  const auto vmax = [](const VecF& a, const VecF& b) { return at::vec::maximum(a, b); };
  const float any_v = at::vec::vec_reduce_all<float>(vmax, any_max);
  *all_max = (std::isnan(any_v) || std::isnan(any_s)) ? std::numeric_limits<float>::quiet_NaN()
                                                     : std::max(any_v, any_s);
  return std::max(in_s, at::vec::vec_reduce_all<float>(vmax, in_max));
}

// Quantizes token rows [m0, m1); returns how many have NaN / Inf values
// (their codes are left zero and y must not be used). With an outlier
// threshold, flags the outlier columns in `flags` (uint8 [K]).
template <typename scalar_t>
int64_t quantize_rows(const W8A8Problem& p, int64_t m0, int64_t m1, Code* codes, int64_t kq,
                      int32_t* qsum, float* sx, uint8_t* flags) {
  const int64_t K = p.K;
  std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : K);
  int64_t bad = 0;
  for (int64_t m = m0; m < m1; ++m) {
    const scalar_t* xs = static_cast<const scalar_t*>(p.x) + m * K;
    const float* xf;
    if constexpr (std::is_same_v<scalar_t, float>) {
      xf = xs;
    } else {
      at::vec::convert(xs, buf.data(), K);
      xf = buf.data();
    }
    Code* row = codes + m * kq;
    std::fill(row + K, row + kq, Code(0));
    // max |x| also screens a static grid's rows: NaN propagates through
    // at::vec::maximum, and Inf / NaN have no code.
    float all_max = 0.0f, amax = 0.0f;
    if (p.outlier_threshold > 0.0f) {
      // Inf is an outlier like any large value; only NaN leaves the row without codes.
      amax = inlier_absmax(xf, K, p.outlier_threshold, flags, &all_max);
      all_max = std::isnan(all_max) ? all_max : amax;
    } else {
      amax = K == 0 ? 0.0f
                    : at::vec::map_reduce_all<float>(
                          [](const VecF& v) { return v.abs(); },
                          [](const VecF& a, const VecF& b) { return at::vec::maximum(a, b); },
                          xf, K);
      all_max = amax;
    }
    if (!std::isfinite(all_max)) {
      std::fill(row, row + K, Code(0));
      qsum[m] = 0;
      sx[m] = 0.0f;
      ++bad;
      continue;
    }
    float scale, zero;
    if (p.input_scale != nullptr) {
      scale = *p.input_scale;
      zero = 0.0f;
    } else {
      // quantize_per_token's grid: max(max|x| / 127.5, eps), zero-point 0.
      grid_from_range(-amax, amax, -128.0f, 127.0f, /*symmetric=*/true,
                      torchquant::ptq::kMinTokenScale, &scale, &zero);
    }
    const QuantGrid<float> g{scale, 1.0f / scale, zero, -128.0f, 127.0f};
    qsum[m] = store_codes(xf, K, g, row);
    sx[m] = scale;
  }
  return bad;
}

}  // namespace CPU_CAPABILITY
}  // namespace torchquant::cpu::int8
