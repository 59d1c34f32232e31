// SIMD decode of one packed chunk (packed_layout.h) into its slices: slice i
// holds the codes of the chunk's columns 16 i .. 16 i + 15, one 32-bit lane
// each, after one widening load per 16 bytes and a shift and a mask per
// slice. The scalar code_at in packed_layout.h is the definition these must
// match (tests compare the two on every bit width).
#pragma once

#include "../packed_layout.h"
#include "simd16.h"

#include <utility>

namespace torchquant::cpu {
namespace CPU_CAPABILITY {

template <int BITS>
struct Chunk {
  static constexpr int kSlices = static_cast<int>(layout::chunk_codes(BITS) / 16);
  static constexpr int kCodes = static_cast<int>(layout::chunk_codes(BITS));
  static constexpr int kBytes = static_cast<int>(layout::chunk_bytes(BITS));

  // 8 / 4 / 2 bits: slice i is bits [BITS i, BITS (i + 1)) of the chunk's 16 bytes.
  template <int I>
  static simd::I16 slice(simd::I16 b) {
    if constexpr (I == kSlices - 1) {
      return simd::srli<BITS * I>(b);  // the top field needs no mask
    } else {
      return simd::and_(simd::srli<BITS * I>(b), (1u << BITS) - 1u);
    }
  }

  // 3 bits: low two bits in byte block I / 4 at bit 2 (I % 4); the high bit in
  // block 2 at bit I, moved to bit 2.
  template <int I>
  static simd::I16 slice3(simd::I16 low_block, simd::I16 high) {
    simd::I16 low = simd::srli<2 * (I % 4)>(low_block);
    if constexpr (I % 4 != 3) low = simd::and_(low, 3u);
    simd::I16 hi;
    if constexpr (I < 2) {
      hi = simd::slli<2 - I>(high);
    } else {
      hi = simd::srli<I - 2>(high);
    }
    return simd::or_(low, simd::and_(hi, 4u));
  }

  template <size_t... I>
  static void codes_impl(const uint8_t* p, simd::I16* u, std::index_sequence<I...>) {
    if constexpr (BITS == 3) {
      const simd::I16 l0 = simd::load_u8(p), l1 = simd::load_u8(p + 16);
      const simd::I16 h = simd::load_u8(p + 32);
      ((u[I] = slice3<static_cast<int>(I)>(I < 4 ? l0 : l1, h)), ...);
    } else {
      const simd::I16 b = simd::load_u8(p);
      ((u[I] = slice<static_cast<int>(I)>(b)), ...);
    }
  }

  // The codes of every slice of the chunk at p.
  static void codes(const uint8_t* p, simd::I16* u) {
    codes_impl(p, u, std::make_index_sequence<kSlices>{});
  }
};

// v(u): the code itself, or its lookup-table level.
template <bool LUT>
inline simd::F16 code_value(simd::I16 u, const simd::Lut16& lut) {
  if constexpr (LUT) {
    return simd::lookup(lut, u);
  } else {
    return simd::to_float(u);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace torchquant::cpu
