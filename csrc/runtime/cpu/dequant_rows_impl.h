// Dequantizing rows of a packed weight into float buffers (the panels of
// the large-M path and the fallback of the GEMV), compiled once per
// instruction set like the kernels that include it.
#pragma once

#include "chunk_decode.h"

#include "../linear_args.h"

#include <algorithm>
#include <vector>

namespace torchquant::cpu {
namespace CPU_CAPABILITY {
namespace {

using simd::F16;

// Raw view of a checked PackedWeight.
struct Weight {
  const uint8_t* packed;
  const float* scales;
  const float* zeros;
  const float* lut;
  int64_t bits, row_bytes, groups, group_size, chunks, kp;
  // Slices per group for the vector paths (a whole padded row when G == 1).
  int64_t slices_per_group;

  explicit Weight(const PackedWeight& w)
      : packed(w.packed.const_data_ptr<uint8_t>()),
        scales(w.scales.const_data_ptr<float>()),
        zeros(w.zeros.const_data_ptr<float>()),
        lut(w.lut.defined() ? w.lut.const_data_ptr<float>() : nullptr),
        bits(w.bits),
        row_bytes(w.row_bytes()),
        groups(w.groups),
        group_size(w.group_size),
        chunks(layout::num_chunks(w.in_features, w.bits)),
        kp(w.padded_in_features()),
        slices_per_group(w.groups == 1 ? w.padded_in_features() / 16 : w.group_size / 16) {}
};

bool slices_within_groups(const PackedWeight& w) {
  return w.groups == 1 || w.group_size % 16 == 0;
}

float* scratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
  return buffer.data();
}

// ---- Dequantizing rows into a float buffer ----------------------------------

// Rows [n0, n1), Kp columns each (row stride ld), any grouping. Columns past K
// (zero codes) take the last group's grid: finite, and met by zero activations.
void decode_rows_scalar(const Weight& w, int64_t n0, int64_t n1,
                        float* out, int64_t ld) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.packed + n * w.row_bytes;
    const float* s = w.scales + n * w.groups;
    const float* z = w.zeros + n * w.groups;
    float* o = out + (n - n0) * ld;
    for (int64_t k = 0; k < w.kp; ++k) {
      const int64_t grp = std::min(k / w.group_size, w.groups - 1);
      const uint32_t u = layout::code_at(row, k, w.bits);
      const float v = w.lut != nullptr ? w.lut[u] : static_cast<float>(u);
      o[k] = (v - z[grp]) * s[grp];
    }
  }
}

// The same, slice by slice in registers: W = v * s - s * z.
template <int BITS, bool LUT>
void decode_rows_vec(const Weight& w, int64_t n0, int64_t n1, float* out, int64_t ld) {
  using C = Chunk<BITS>;
  const simd::Lut16 lut = LUT ? simd::load_lut(w.lut) : simd::Lut16{};
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.packed + n * w.row_bytes;
    const float* s = w.scales + n * w.groups;
    const float* z = w.zeros + n * w.groups;
    float* o = out + (n - n0) * ld;
    int64_t grp = 0, left = w.slices_per_group;
    F16 scale = simd::set1(s[0]), shift = simd::set1(-s[0] * z[0]);
    for (int64_t c = 0; c < w.chunks; ++c) {
      simd::I16 u[C::kSlices];
      C::codes(row + c * C::kBytes, u);
      for (int i = 0; i < C::kSlices; ++i) {
        simd::storeu(o + c * C::kCodes + 16 * i,
                     simd::fmadd(code_value<LUT>(u[i], lut), scale, shift));
        if (--left == 0 && grp + 1 < w.groups) {
          ++grp;
          left = w.slices_per_group;
          scale = simd::set1(s[grp]);
          shift = simd::set1(-s[grp] * z[grp]);
        }
      }
    }
  }
}

using DecodeFn = void (*)(const Weight&, int64_t, int64_t, float*, int64_t);

template <int BITS>
DecodeFn decode_for_lut(bool lut) {
  return lut ? &decode_rows_vec<BITS, true> : &decode_rows_vec<BITS, false>;
}

// The vector decoder for this weight, or nullptr where only the scalar one applies.
DecodeFn vector_decoder(const PackedWeight& pw) {
  if (!slices_within_groups(pw)) return nullptr;
  const bool lut = pw.lut.defined();
  switch (pw.bits) {
    case 2: return decode_for_lut<2>(lut);
    case 3: return decode_for_lut<3>(lut);
    case 4: return decode_for_lut<4>(lut);
    default: return decode_for_lut<8>(lut);
  }
}

void decode_rows(const Weight& w, DecodeFn vec, int64_t n0, int64_t n1, float* out, int64_t ld) {
  if (vec != nullptr) {
    vec(w, n0, n1, out, ld);
  } else {
    decode_rows_scalar(w, n0, n1, out, ld);
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace torchquant::cpu
