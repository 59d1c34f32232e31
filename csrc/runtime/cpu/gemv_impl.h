// The small-M path of quantized_linear (decode, memory bound): every packed
// byte is read once from memory and dequantized in registers. Compiled once
// per instruction set.
//
// A chunk is decoded slice by slice (16 columns) and multiplied into one
// accumulator per activation row; at the end of each group the accumulator
// is folded in with the group's scale, and the zero-points enter once per
// output through per-group sums of x:
//     y[m, n] = sum_G s (sum_{k in G} v(u) x[m, k]) - sum_G s z (sum_{k in G} x[m, k]).
//
// Blocking: W is walked in tiles of kTileRows rows handed to threads one at a
// time. Within a tile, up to kMaxRowsPerPass activation rows share each
// decoded slice, and the columns are cut into K-blocks whose activations
// (interleaved [slice][row][16], so every load is a constant offset from one
// pointer) stay in L1 while all rows of the tile read them. The running sums
// of a row live in a small per-tile buffer between K-blocks; a group cut by a
// K-block boundary is folded in two parts with the same scale.
#pragma once

#include "dequant_rows_impl.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <utility>

namespace torchquant::cpu {
namespace CPU_CAPABILITY {
namespace {

// Activation rows sharing one decoded slice: MB accumulators and MB totals
// must fit the register file (32 zmm on AVX-512, 16 ymm pairs on AVX2).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kMaxRowsPerPass = 8;
#else
constexpr int kMaxRowsPerPass = 4;
#endif
constexpr int64_t kTileRows = 16;
// Bytes of interleaved activations per K-block: half of a 32 KiB L1.
constexpr int64_t kBlockActivationBytes = 16 * 1024;

// Per-row state carried between the K-blocks of one tile.
struct RowState {
  int64_t group;  // group of the next slice
  int64_t left;   // slices left in that group
};

// Rows [n0, n1) of a tile, chunks [c0, c1), MB activation rows interleaved at
// xb (slice s of row m at xb + (s * MB + m) * 16). tot: [rows][MB] running sums.
template <int BITS, bool LUT, int MB>
void gemv_block(const Weight& w, const float* xb, int64_t n0, int64_t n1, int64_t c0, int64_t c1,
                F16* tot_buf, RowState* state) {
  using C = Chunk<BITS>;
  const simd::Lut16 lut = LUT ? simd::load_lut(w.lut) : simd::Lut16{};
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.packed + n * w.row_bytes;
    const float* s = w.scales + n * w.groups;
    F16* tot_row = tot_buf + (n - n0) * MB;
    F16 acc[MB], tot[MB];
    for (int m = 0; m < MB; ++m) {
      acc[m] = simd::zero();
      tot[m] = tot_row[m];
    }
    int64_t grp = state[n - n0].group, left = state[n - n0].left;
    for (int64_t c = c0; c < c1; ++c) {
      simd::I16 u[C::kSlices];
      C::codes(row + c * C::kBytes, u);
      const float* xc = xb + c * C::kCodes * MB;
      for (int i = 0; i < C::kSlices; ++i) {
        const F16 v = code_value<LUT>(u[i], lut);
        for (int m = 0; m < MB; ++m)
          acc[m] = simd::fmadd(v, simd::loadu(xc + (i * MB + m) * 16), acc[m]);
        if (--left == 0) {
          left = w.slices_per_group;
          // Padding slices past the last group meet zero activations; their
          // "group" has no scale and is skipped.
          if (grp < w.groups) {
            const F16 sv = simd::set1(s[grp]);
            for (int m = 0; m < MB; ++m) {
              tot[m] = simd::fmadd(acc[m], sv, tot[m]);
              acc[m] = simd::zero();
            }
          }
          ++grp;
        }
      }
    }
    // The part of a group that this K-block saw.
    if (left != w.slices_per_group && grp < w.groups) {
      const F16 sv = simd::set1(s[grp]);
      for (int m = 0; m < MB; ++m) tot[m] = simd::fmadd(acc[m], sv, tot[m]);
    }
    for (int m = 0; m < MB; ++m) tot_row[m] = tot[m];
    state[n - n0] = {grp, left};
  }
}

using GemvBlockFn = void (*)(const Weight&, const float*, int64_t, int64_t, int64_t, int64_t,
                             F16*, RowState*);

template <int BITS, bool LUT, int... MB>
GemvBlockFn gemv_for_rows(int rows, std::integer_sequence<int, MB...>) {
  GemvBlockFn fn = nullptr;
  ((fn = (rows == MB + 1) ? &gemv_block<BITS, LUT, MB + 1> : fn), ...);
  return fn;
}

template <int BITS>
GemvBlockFn gemv_for(bool lut, int rows) {
  using Seq = std::make_integer_sequence<int, kMaxRowsPerPass>;
  return lut ? gemv_for_rows<BITS, true>(rows, Seq{}) : gemv_for_rows<BITS, false>(rows, Seq{});
}

GemvBlockFn gemv_kernel(int64_t bits, bool lut, int rows) {
  switch (bits) {
    case 2: return gemv_for<2>(lut, rows);
    case 3: return gemv_for<3>(lut, rows);
    case 4: return gemv_for<4>(lut, rows);
    default: return gemv_for<8>(lut, rows);
  }
}

// sum_j s[j] z[j] xs[j]: the zero-point term of one output.
float zero_term(const float* s, const float* z, const float* xs, int64_t groups) {
  F16 acc = simd::zero();
  int64_t j = 0;
  for (; j + 16 <= groups; j += 16)
    acc = simd::fmadd(simd::fmadd(simd::loadu(s + j), simd::loadu(z + j), simd::zero()),
                      simd::loadu(xs + j), acc);
  float r = simd::hsum(acc);
  for (; j < groups; ++j) r += s[j] * z[j] * xs[j];
  return r;
}

// Groupings the slice decoder cannot fold (g % 16 != 0): each row is
// dequantized into a buffer and dotted with the activation rows.
void gemv_generic(const Weight& w, const float* x, int64_t m, float* y, int64_t ldy,
                  const float* bias, int64_t n0, int64_t n1) {
  float* buf = scratch(w.kp);
  for (int64_t n = n0; n < n1; ++n) {
    decode_rows_scalar(w, n, n + 1, buf, w.kp);
    for (int64_t i = 0; i < m; ++i) {
      F16 acc = simd::zero();
      for (int64_t k = 0; k < w.kp; k += 16)
        acc = simd::fmadd(simd::loadu(buf + k), simd::loadu(x + i * w.kp + k), acc);
      y[i * ldy + n] = simd::hsum(acc) + (bias != nullptr ? bias[n] : 0.0f);
    }
  }
}

// x [M, Kp] -> per pass of up to kMaxRowsPerPass rows, [Kp / 16][rows][16].
at::Tensor interleave_passes(const at::Tensor& x) {
  const int64_t m = x.size(0), kp = x.size(1);
  at::Tensor out = at::empty({m * kp}, x.options());
  for (int64_t m0 = 0; m0 < m; m0 += kMaxRowsPerPass) {
    const int64_t rows = std::min<int64_t>(kMaxRowsPerPass, m - m0);
    out.narrow(0, m0 * kp, rows * kp)
        .view({kp / 16, rows, 16})
        .copy_(x.narrow(0, m0, rows).view({rows, kp / 16, 16}).transpose(0, 1));
  }
  return out;
}

void gemv(const PackedWeight& pw, const at::Tensor& x, const at::Tensor& bias, at::Tensor& y) {
  const Weight w(pw);
  const int64_t m = x.size(0), n = pw.out_features;
  float* yp = y.data_ptr<float>();
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  const bool vec = slices_within_groups(pw);
  at::Tensor xsum, xi;
  if (vec) {
    // Per-group sums of x for the zero-point term, once per call.
    const int64_t span = pw.groups == 1 ? w.kp : w.group_size;
    xsum = x.narrow(1, 0, span * pw.groups).view({m, pw.groups, span}).sum(-1).contiguous();
    xi = interleave_passes(x);
  }
  const int64_t tiles = (n + kTileRows - 1) / kTileRows;
  const int64_t chunk_codes = layout::chunk_codes(pw.bits);

  auto run_tile = [&](int64_t t) {
    const int64_t r0 = t * kTileRows, r1 = std::min(n, r0 + kTileRows);
    if (!vec) {
      gemv_generic(w, x.const_data_ptr<float>(), m, yp, n, bp, r0, r1);
      return;
    }
    F16 tot[kTileRows * kMaxRowsPerPass];
    RowState state[kTileRows];
    for (int64_t m0 = 0; m0 < m; m0 += kMaxRowsPerPass) {
      const int rows = static_cast<int>(std::min<int64_t>(kMaxRowsPerPass, m - m0));
      const GemvBlockFn kernel = gemv_kernel(pw.bits, w.lut != nullptr, rows);
      const float* xb = xi.const_data_ptr<float>() + m0 * w.kp;
      const int64_t block_chunks =
          std::max<int64_t>(1, kBlockActivationBytes / (4 * rows * chunk_codes));
      for (int64_t r = 0; r < (r1 - r0) * rows; ++r) tot[r] = simd::zero();
      for (int64_t r = 0; r < r1 - r0; ++r) state[r] = {0, w.slices_per_group};
      for (int64_t c0 = 0; c0 < w.chunks; c0 += block_chunks)
        kernel(w, xb, r0, r1, c0, std::min(w.chunks, c0 + block_chunks), tot, state);
      const float* xs = xsum.const_data_ptr<float>() + m0 * pw.groups;
      for (int64_t j = r0; j < r1; ++j) {
        const float* s = w.scales + j * w.groups;
        const float* z = w.zeros + j * w.groups;
        const float b = bp != nullptr ? bp[j] : 0.0f;
        for (int i = 0; i < rows; ++i) {
          yp[(m0 + i) * n + j] = simd::hsum(tot[(j - r0) * rows + i]) -
                                 zero_term(s, z, xs + i * pw.groups, pw.groups) + b;
        }
      }
    }
  };
  // Tiles are handed out one at a time rather than split evenly in advance:
  // on a busy machine a descheduled thread then delays the call by its
  // wake-up, not by half of the work. A thread is worth starting for at
  // least 32 KiB of packed bytes.
  const int64_t tiles_per_worker =
      std::max<int64_t>(1, (int64_t{1} << 15) / (kTileRows * w.row_bytes));
  const int64_t workers = std::clamp<int64_t>((tiles + tiles_per_worker - 1) / tiles_per_worker,
                                              1, at::get_num_threads());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < tiles; t = next.fetch_add(1)) run_tile(t);
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace torchquant::cpu
