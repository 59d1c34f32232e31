// Sixteen-lane vectors for the weight decoders: one slice of a packed chunk
// (16 consecutive columns, packed_layout.h) is one F16 of floats or one I16
// of 32-bit codes. One __m512 on AVX-512, two __m256 on AVX2, plain arrays
// (left to the compiler's vectoriser) in the baseline build. Compiled once per
// instruction set: everything lives in the CPU_CAPABILITY namespace.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace torchquant::cpu {
namespace CPU_CAPABILITY {
namespace simd {

#if defined(CPU_CAPABILITY_AVX512)

struct F16 { __m512 v; };
struct I16 { __m512i v; };
struct Lut16 { __m512 v; };

inline I16 load_u8(const uint8_t* p) {
  return {_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
template <int S> inline I16 srli(I16 a) { return {_mm512_srli_epi32(a.v, S)}; }
template <int S> inline I16 slli(I16 a) { return {_mm512_slli_epi32(a.v, S)}; }
inline I16 and_(I16 a, uint32_t mask) { return {_mm512_and_si512(a.v, _mm512_set1_epi32(mask))}; }
inline I16 or_(I16 a, I16 b) { return {_mm512_or_si512(a.v, b.v)}; }
inline F16 to_float(I16 a) { return {_mm512_cvtepi32_ps(a.v)}; }
inline Lut16 load_lut(const float* lut) { return {_mm512_loadu_ps(lut)}; }
// Codes are < 16: one in-register table lookup.
inline F16 lookup(const Lut16& t, I16 idx) { return {_mm512_permutexvar_ps(idx.v, t.v)}; }
inline F16 zero() { return {_mm512_setzero_ps()}; }
inline F16 set1(float a) { return {_mm512_set1_ps(a)}; }
inline F16 loadu(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void storeu(float* p, F16 a) { _mm512_storeu_ps(p, a.v); }
inline F16 fmadd(F16 a, F16 b, F16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline F16 add(F16 a, F16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline float hsum(F16 a) { return _mm512_reduce_add_ps(a.v); }

#elif defined(CPU_CAPABILITY_AVX2)

struct F16 { __m256 lo, hi; };
struct I16 { __m256i lo, hi; };
struct Lut16 { __m256 lo, hi; };

inline I16 load_u8(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_cvtepu8_epi32(b), _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(b, b))};
}
template <int S> inline I16 srli(I16 a) {
  return {_mm256_srli_epi32(a.lo, S), _mm256_srli_epi32(a.hi, S)};
}
template <int S> inline I16 slli(I16 a) {
  return {_mm256_slli_epi32(a.lo, S), _mm256_slli_epi32(a.hi, S)};
}
inline I16 and_(I16 a, uint32_t mask) {
  const __m256i m = _mm256_set1_epi32(static_cast<int>(mask));
  return {_mm256_and_si256(a.lo, m), _mm256_and_si256(a.hi, m)};
}
inline I16 or_(I16 a, I16 b) { return {_mm256_or_si256(a.lo, b.lo), _mm256_or_si256(a.hi, b.hi)}; }
inline F16 to_float(I16 a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
inline Lut16 load_lut(const float* lut) { return {_mm256_loadu_ps(lut), _mm256_loadu_ps(lut + 8)}; }
// Codes are < 16: look both halves of the table up by the low three bits and
// pick by bit 3 (moved to the sign bit that blendv reads).
inline __m256 lookup8(const Lut16& t, __m256i idx) {
  const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, idx),
                          _mm256_permutevar8x32_ps(t.hi, idx), sel);
}
inline F16 lookup(const Lut16& t, I16 idx) { return {lookup8(t, idx.lo), lookup8(t, idx.hi)}; }
inline F16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F16 set1(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline F16 loadu(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void storeu(float* p, F16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline F16 fmadd(F16 a, F16 b, F16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline F16 add(F16 a, F16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline float hsum(F16 a) {
  const __m256 s = _mm256_add_ps(a.lo, a.hi);
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

#else

struct F16 { float v[16]; };
struct I16 { uint32_t v[16]; };
struct Lut16 { float v[16]; };

inline I16 load_u8(const uint8_t* p) {
  I16 r;
  for (int j = 0; j < 16; ++j) r.v[j] = p[j];
  return r;
}
template <int S> inline I16 srli(I16 a) {
  for (auto& x : a.v) x >>= S;
  return a;
}
template <int S> inline I16 slli(I16 a) {
  for (auto& x : a.v) x <<= S;
  return a;
}
inline I16 and_(I16 a, uint32_t mask) {
  for (auto& x : a.v) x &= mask;
  return a;
}
inline I16 or_(I16 a, I16 b) {
  for (int j = 0; j < 16; ++j) a.v[j] |= b.v[j];
  return a;
}
inline F16 to_float(I16 a) {
  F16 r;
  for (int j = 0; j < 16; ++j) r.v[j] = static_cast<float>(a.v[j]);
  return r;
}
inline Lut16 load_lut(const float* lut) {
  Lut16 t;
  std::memcpy(t.v, lut, sizeof(t.v));
  return t;
}
inline F16 lookup(const Lut16& t, I16 idx) {
  F16 r;
  for (int j = 0; j < 16; ++j) r.v[j] = t.v[idx.v[j] & 15];
  return r;
}
inline F16 set1(float a) {
  F16 r;
  for (auto& x : r.v) x = a;
  return r;
}
inline F16 zero() { return set1(0.0f); }
inline F16 loadu(const float* p) {
  F16 r;
  std::memcpy(r.v, p, sizeof(r.v));
  return r;
}
inline void storeu(float* p, F16 a) { std::memcpy(p, a.v, sizeof(a.v)); }
// Multiply then add, rounded twice (the build forbids contraction), like the
// reference the SIMD builds are compared with up to float tolerance.
inline F16 fmadd(F16 a, F16 b, F16 c) {
  for (int j = 0; j < 16; ++j) c.v[j] += a.v[j] * b.v[j];
  return c;
}
inline F16 add(F16 a, F16 b) {
  for (int j = 0; j < 16; ++j) a.v[j] += b.v[j];
  return a;
}
inline float hsum(F16 a) {
  float s = 0.0f;
  for (float x : a.v) s += x;
  return s;
}

#endif

}  // namespace simd
}  // namespace CPU_CAPABILITY
}  // namespace torchquant::cpu
