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

// Quantizes token rows [m0, m1); returns how many have NaN / Inf values
// (their codes are left zero and y must not be used).
template <typename scalar_t>
int64_t quantize_rows(const W8A8Problem& p, int64_t m0, int64_t m1, Code* codes, int64_t kq,
                      int32_t* qsum, float* sx) {
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
    const float amax = K == 0 ? 0.0f
                              : at::vec::map_reduce_all<float>(
                                    [](const VecF& v) { return v.abs(); },
                                    [](const VecF& a, const VecF& b) { return at::vec::maximum(a, b); },
                                    xf, K);
    if (!std::isfinite(amax)) {
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
