// CPU kernel of the W8A8 linear op, compiled once per instruction set: the
// including file defines CPU_CAPABILITY (and the matching compiler flags).
//
//   1. Quantize (int8_quantize_impl.h): token rows of x -> codes q, sum_k q, s_x.
//   2. Multiply: acc[m, n] = sum_k q[m, k] * (u[n, k] - 128). The SIMD dot
//      products use the weight bytes u directly as the unsigned operand
//      (vpdpbusd on AVX-512 VNNI), so  sum_k q * u = acc + 128 * sum_k q  and
//      the compensation needs only the per-token code sum, no weight row sums.
//      All int32 arithmetic wraps, and acc itself is exact while
//      K * 128 * 128 < 2^31 (K < 131072), whatever the intermediate sums do.
//   3. Epilogue: y = acc * s_x * s_w + bias in float32, stored in x's dtype.
//
// Work decomposition. Tiles of MR token rows x NR weight rows: one SIMD
// accumulator per (token, weight row) pair over the whole K, reduced across
// lanes once at the end (the packed layout keeps weight rows contiguous, so
// dot products need no repacking). Threads split the weight rows.
//   * M <= kSmallM (decode, small batches): one tile of all tokens, so each
//     weight byte is read from memory once (GEMV), prefetching rows ahead.
//   * Larger M: each thread walks its rows in panels sized for L2 and runs
//     every token tile over a panel (a tile's MR code rows stay in L1), while
//     the next panel is prefetched into L2, spread over the tiles, so that
//     memory time hides under compute.
#pragma once

#include "int8_quantize_impl.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <vector>

namespace torchquant::cpu::int8 {
namespace CPU_CAPABILITY {

// Tile shapes per instruction set. Large M: kMR tokens x kNR weight rows.
// M <= kSmallM: all M tokens x small_nr(M) rows (more rows per code load the
// fewer tokens there are). Register budget: MR * NR accumulators + NR weight
// vectors + 1 code vector.
#if defined(CPU_CAPABILITY_AVX512)
// 24 + 6 + 1 of 32 zmm (3 x 8 and 6 x 4 measure the same).
constexpr int kMR = 4, kNR = 6;
constexpr int kSmallM = 8;
constexpr int small_nr(int m) { return m <= 2 ? 8 : m <= 4 ? 6 : m <= 6 ? 4 : 3; }
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kMR = 2, kNR = 4;  // 8 + 4 + 1 of 16 ymm
constexpr int kSmallM = 2;
constexpr int small_nr(int) { return 4; }
#else
constexpr int kMR = 1, kNR = 1;
constexpr int kSmallM = 1;
constexpr int small_nr(int) { return 1; }
#endif

// Weight bytes per L2 panel (of the 1-2 MiB per core, leaving room for the
// next panel being prefetched and for the code tiles, which stream through).
constexpr int64_t kPanelBytes = 384 * 1024;
// Tiles that read the weight from memory prefetch the rows of the tile
// kPrefetchTiles ahead into L2: each row starts a new stream (a new 4 KiB page
// for K = 4096) that the hardware prefetchers would only pick up after a few
// misses. Measured: +10% bandwidth at M = 1.
constexpr int kPrefetchTiles = 2;
// Multiply-adds per parallel task, so that small calls run on one thread.
constexpr int64_t kGrainMacs = 1 << 20;

// ---- Dot-product tiles ------------------------------------------------------------------

#if defined(CPU_CAPABILITY_AVX512)
// Sums each of a, b, c, d across its lanes: returns [sum a, sum b, sum c, sum d].
C10_ALWAYS_INLINE __m128i reduce4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i abcd =
      _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i s =
      _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}
C10_ALWAYS_INLINE int32_t reduce1(__m512i a) { return _mm512_reduce_add_epi32(a); }
using Acc = __m512i;
#elif defined(CPU_CAPABILITY_AVX2)
C10_ALWAYS_INLINE __m128i reduce4(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
  return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}
C10_ALWAYS_INLINE int32_t reduce1(__m256i a) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  s = _mm_hadd_epi32(s, s);
  return _mm_cvtsi128_si32(_mm_hadd_epi32(s, s));
}
using Acc = __m256i;
#endif

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
template <int T>
C10_ALWAYS_INLINE void reduce_all(const Acc* acc, int32_t* out) {
  int t = 0;
#pragma GCC unroll 8
  for (; t + 4 <= T; t += 4) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + t),
                     reduce4(acc[t], acc[t + 1], acc[t + 2], acc[t + 3]));
  }
#pragma GCC unroll 4
  for (; t < T; ++t) out[t] = reduce1(acc[t]);
}
#endif

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// The MR x NR dot products of q[i * qs + k] and w[j * ws + k] over k < kw, as
// SIMD vectors of partial sums (lanes[i * NR + j]; wrapping int32). kw is a
// multiple of 16; the code rows are zero-padded to kCodeAlign.
//
// Written so that GCC keeps the accumulators in registers: fully unrolled
// with constant indices, one loop body (a separate tail block spills), not
// inlined into the tile loop, and the lanes stored to memory rather than
// reduced here (reducing four accumulators at once in the same function also
// makes GCC spill them all inside the loop).
template <int MR, int NR, bool kPrefetch, bool kMasked>
__attribute__((noinline)) void dot_lanes(const Code* q, int64_t qs, const uint8_t* w,
                                         int64_t ws, int64_t kw, Acc* lanes,
                                         const uint8_t* pf, int64_t pf_lines) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512i acc[MR * NR];
#pragma GCC unroll 32
  for (int t = 0; t < MR * NR; ++t) acc[t] = _mm512_setzero_si512();
  for (int64_t k = 0; k < kw; k += 64) {
    // A row may end 16, 32 or 48 bytes into its last 64-byte chunk. A full
    // load then reads the start of the next row, which meets zero codes (the
    // code rows are zero-padded to 64) and adds nothing; only past the last
    // row of the weight could it fault, so the tile holding that row masks
    // (masked loads measured 5% slower, so the others do not).
    __m512i b[NR];
    if constexpr (kMasked) {
      const __mmask64 mask = kw - k >= 64 ? ~__mmask64(0) : (~__mmask64(0)) >> (64 - (kw - k));
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) b[j] = _mm512_maskz_loadu_epi8(mask, w + j * ws + k);
    } else {
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) b[j] = _mm512_loadu_si512(w + j * ws + k);
    }
    if constexpr (kPrefetch) {
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) {
        // Never faults, also past the end of the weight.
        _mm_prefetch(reinterpret_cast<const char*>(w + (kPrefetchTiles * NR + j) * ws + k),
                     _MM_HINT_T1);
      }
    } else {
      for (int64_t l = 0; l < pf_lines; ++l) {
        _mm_prefetch(reinterpret_cast<const char*>(pf + 64 * l), _MM_HINT_T1);
      }
      pf += 64 * pf_lines;
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512i a = _mm512_loadu_si512(q + i * qs + k);
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) acc[i * NR + j] = _mm512_dpbusd_epi32(acc[i * NR + j], b[j], a);
    }
  }
#pragma GCC unroll 32
  for (int t = 0; t < MR * NR; ++t) _mm512_storeu_si512(lanes + t, acc[t]);
#else
  __m256i acc[MR * NR];
#pragma GCC unroll 16
  for (int t = 0; t < MR * NR; ++t) acc[t] = _mm256_setzero_si256();
  for (int64_t k = 0; k < kw; k += 16) {
    if ((k & 63) == 0) {  // once per line, as in the AVX-512 loop
      if constexpr (kPrefetch) {
#pragma GCC unroll 8
        for (int j = 0; j < NR; ++j) {
          _mm_prefetch(reinterpret_cast<const char*>(w + (kPrefetchTiles * NR + j) * ws + k),
                       _MM_HINT_T1);
        }
      } else {
        for (int64_t l = 0; l < pf_lines; ++l) {
          _mm_prefetch(reinterpret_cast<const char*>(pf + 64 * l), _MM_HINT_T1);
        }
        pf += 64 * pf_lines;
      }
    }
    __m256i b[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      b[j] = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * ws + k)));
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * qs + k));
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) {
        acc[i * NR + j] = _mm256_add_epi32(acc[i * NR + j], _mm256_madd_epi16(b[j], a));
      }
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < MR * NR; ++t) _mm256_storeu_si256(lanes + t, acc[t]);
#endif
}
#endif

// out[i * NR + j] = sum_k q[i * qs + k] * w[j * ws + k] over k < kw (wrapping int32).
template <int MR, int NR, bool kPrefetch, bool kMasked>
C10_ALWAYS_INLINE void dot_tile(const Code* q, int64_t qs, const uint8_t* w, int64_t ws,
                                int64_t kw, int32_t* out, const uint8_t* pf = nullptr,
                                int64_t pf_lines = 0) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  Acc lanes[MR * NR];
  dot_lanes<MR, NR, kPrefetch, kMasked>(q, qs, w, ws, kw, lanes, pf, pf_lines);
  reduce_all<MR * NR>(lanes, out);
#else
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      uint32_t s = 0;  // unsigned: wraps without undefined behaviour
      for (int64_t k = 0; k < kw; ++k) {
        s += static_cast<uint32_t>(static_cast<int32_t>(q[i * qs + k]) * w[j * ws + k]);
      }
      out[i * NR + j] = static_cast<int32_t>(s);
    }
  }
#endif
}

// ---- Driver and epilogue ----------------------------------------------------------------

// Prefetches the next panel [next, end) into L2 while the tiles of the
// current one run: each of the `slices` tiles takes an equal share, a few
// lines per loop iteration (one burst per tile measured slower: it overflows
// the miss buffers).
struct PanelPrefetch {
  const uint8_t* next;
  const uint8_t* end;
  int64_t step;
  PanelPrefetch(const uint8_t* begin, const uint8_t* end_, int64_t slices)
      : next(begin), end(end_), step(round_up((end_ - begin) / std::max<int64_t>(slices, 1) + 1, 64)) {}
  // The share of one tile: `lines` lines in each of its `iters` iterations.
  void take(int64_t iters, const uint8_t** pf, int64_t* lines) {
    const int64_t avail = (end - next) / 64;
    *lines = avail <= 0 ? 0 : std::min<int64_t>(avail, (step / 64 + iters - 1) / iters);
    *pf = next;
    next = std::min(end, next + *lines * 64 * iters);
  }
};

template <typename scalar_t>
struct Gemm {
  const Code* codes;
  int64_t kq;  // code row stride
  const int32_t* qsum;
  const float* sx;
  const uint8_t* w;
  int64_t kw;  // weight row bytes (stride and dot length)
  const float* sw;
  const float* bias;
  scalar_t* y;
  int64_t M, N;

  // y for tokens [m0, m0 + mr) x weight rows [n0, n0 + nr) from the dot products.
  void store(int64_t m0, int mr, int64_t n0, int nr, const int32_t* dots) const {
#if defined(CPU_CAPABILITY_AVX512)
    // The same float32 operations in the same order, nr lanes at a time (the
    // scalar loop below measured a few percent of a 4 x 6 tile at K = 4096).
    const __mmask16 lanes = static_cast<__mmask16>((1u << nr) - 1u);
    const __m512 swv = _mm512_maskz_loadu_ps(lanes, sw + n0);
    const __m512 bv = bias != nullptr ? _mm512_maskz_loadu_ps(lanes, bias + n0) : __m512();
    for (int i = 0; i < mr; ++i) {
      const int64_t m = m0 + i;
      const __m512i comp = _mm512_set1_epi32(static_cast<int32_t>(128u * static_cast<uint32_t>(qsum[m])));
      const __m512i acc = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(lanes, dots + i * nr), comp);
      __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(sx[m])), swv);
      if (bias != nullptr) v = _mm512_add_ps(v, bv);
      scalar_t* yrow = y + m * N + n0;
      if constexpr (std::is_same_v<scalar_t, float>) {
        _mm512_mask_storeu_ps(yrow, lanes, v);
      } else {
        alignas(64) float t[16];
        _mm512_store_ps(t, v);
        for (int j = 0; j < nr; ++j) yrow[j] = static_cast<scalar_t>(t[j]);
      }
    }
    return;
#endif
    for (int i = 0; i < mr; ++i) {
      const int64_t m = m0 + i;
      const uint32_t comp = 128u * static_cast<uint32_t>(qsum[m]);
      scalar_t* yrow = y + m * N;
      for (int j = 0; j < nr; ++j) {
        const int64_t n = n0 + j;
        const int32_t acc = static_cast<int32_t>(static_cast<uint32_t>(dots[i * nr + j]) - comp);
        float v = static_cast<float>(acc) * sx[m] * sw[n];
        if (bias != nullptr) v += bias[n];
        yrow[n] = static_cast<scalar_t>(v);
      }
    }
  }

  // Tokens [m0, m0 + MR) x weight rows [n0, n1); `ahead` (may be null)
  // prefetches the next panel a slice per tile.
  template <int MR, int NR, bool kPrefetch>
  void tiles(int64_t m0, int64_t n0, int64_t n1, PanelPrefetch* ahead) const {
    int32_t dots[MR * NR];
    const Code* q = codes + m0 * kq;
    int64_t n = n0;
    for (; n + NR <= n1; n += NR) {
      const uint8_t* pf = nullptr;
      int64_t pf_lines = 0;
      if (ahead != nullptr) ahead->take((kw + 63) / 64, &pf, &pf_lines);
      if (n + NR < N || kw % 64 == 0) {
        dot_tile<MR, NR, kPrefetch, false>(q, kq, w + n * kw, kw, kw, dots, pf, pf_lines);
      } else {
        dot_tile<MR, NR, kPrefetch, true>(q, kq, w + n * kw, kw, kw, dots, pf, pf_lines);
      }
      store(m0, MR, n, NR, dots);
    }
    for (; n < n1; ++n) {
      dot_tile<MR, 1, false, true>(q, kq, w + n * kw, kw, kw, dots);
      store(m0, MR, n, 1, dots);
    }
  }

  // The same with a run-time number of token rows mr <= MR.
  template <int NR, bool kPrefetch, int MR = kMR>
  void tiles_mr(int mr, int64_t m0, int64_t n0, int64_t n1, PanelPrefetch* ahead) const {
    if constexpr (MR > 1) {
      if (mr < MR) return tiles_mr<NR, kPrefetch, MR - 1>(mr, m0, n0, n1, ahead);
    }
    tiles<MR, NR, kPrefetch>(m0, n0, n1, ahead);
  }

  // All M <= kSmallM tokens in one tile.
  template <int MR = kSmallM>
  void small_tiles(int64_t n0, int64_t n1) const {
    if constexpr (MR > 1) {
      if (M < MR) return small_tiles<MR - 1>(n0, n1);
    }
    tiles<MR, small_nr(MR), true>(0, n0, n1, nullptr);
  }

  // Output columns (weight rows) [n0, n1), every token.
  void rows(int64_t n0, int64_t n1) const {
    if (M <= kSmallM) return small_tiles(n0, n1);
    const int64_t panel = std::max<int64_t>(kNR, kPanelBytes / std::max<int64_t>(kw, 1));
    const int64_t m_tiles = (M + kMR - 1) / kMR;
    for (int64_t p0 = n0; p0 < n1; p0 += panel) {
      const int64_t p1 = std::min(n1, p0 + panel);
      // While the token tiles run over this panel (from L2), the next panel
      // streams in from memory, a slice before each tile, so that memory time
      // hides under compute. The first panel has no predecessor: its first
      // token tile reads it from memory, prefetching tile by tile.
      PanelPrefetch ahead(w + p1 * kw, w + std::min(n1, p1 + panel) * kw,
                          m_tiles * ((p1 - p0) / kNR));
      for (int64_t m0 = 0; m0 < M; m0 += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m0));
        if (p0 == n0 && m0 == 0) {
          tiles_mr<kNR, true>(mr, m0, p0, p1, &ahead);
        } else {
          tiles_mr<kNR, false>(mr, m0, p0, p1, &ahead);
        }
      }
    }
  }
};

// LLM.int8(): the outlier columns leave the int8 product (the caller adds them
// in float), so their codes become 0 and leave each token's code sum.
inline void zero_outlier_codes(const W8A8Problem& p, Code* codes, int64_t kq, int32_t* qsum) {
  std::vector<int64_t> columns;
  for (int64_t k = 0; k < p.K; ++k) {
    if (p.outlier_columns[k]) columns.push_back(k);
  }
  if (columns.empty()) return;
  at::parallel_for(0, p.M, 256, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      Code* row = codes + m * kq;
      for (const int64_t k : columns) {
        qsum[m] -= static_cast<int32_t>(row[k]);
        row[k] = Code(0);
      }
    }
  });
}

template <typename scalar_t>
int64_t run(const W8A8Problem& p) {
  const int64_t M = p.M, N = p.N, kw = p.w_row_bytes;
  const int64_t kq = round_up(std::max<int64_t>(kw, 1), kCodeAlign);
  // Codes live in an ATen buffer: 64-byte aligned, from the caching allocator.
  const at::Tensor scratch = at::empty({M * kq * static_cast<int64_t>(sizeof(Code))}, at::kByte);
  Code* codes = reinterpret_cast<Code*>(scratch.mutable_data_ptr<uint8_t>());
  std::vector<int32_t> qsum(M);
  std::vector<float> sx(M);

  std::atomic<int64_t> bad{0};
  std::mutex flags_mutex;
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / std::max<int64_t>(p.K, 1)),
                   [&](int64_t m0, int64_t m1) {
                     // Each task flags its own outlier columns, merged once at its end.
                     std::vector<uint8_t> flags(p.outlier_threshold > 0.0f ? p.K : 0, 0);
                     bad += quantize_rows<scalar_t>(p, m0, m1, codes, kq, qsum.data(), sx.data(),
                                                    flags.data());
                     if (flags.empty()) return;
                     const std::lock_guard<std::mutex> lock(flags_mutex);
                     for (int64_t k = 0; k < p.K; ++k) p.outlier_columns[k] |= flags[k];
                   });
  if (bad.load() > 0) return bad.load();
  if (p.outlier_threshold > 0.0f) zero_outlier_codes(p, codes, kq, qsum.data());

  const Gemm<scalar_t> g{codes, kq, qsum.data(), sx.data(), p.w, kw, p.w_scales, p.bias,
                         static_cast<scalar_t*>(p.y), M, N};
  // Tasks are whole groups of tile rows, so threads split at tile boundaries.
  const int64_t nr = M <= kSmallM ? small_nr(static_cast<int>(M)) : kNR;
  const int64_t groups = (N + nr - 1) / nr;
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, M * kw * nr));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    g.rows(g0 * nr, std::min(N, g1 * nr));
  });
  return 0;
}

int64_t w8a8_linear(const W8A8Problem& p) {
  switch (p.dtype) {
    case c10::ScalarType::Float:
      return run<float>(p);
    case c10::ScalarType::Half:
      return run<c10::Half>(p);
    case c10::ScalarType::BFloat16:
      return run<c10::BFloat16>(p);
    default:
      TORCH_CHECK_TYPE(false, "torchquant.w8a8_linear: unsupported input dtype ", p.dtype);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace torchquant::cpu::int8
