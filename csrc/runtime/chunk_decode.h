// Decoding of packed chunks (packed_layout.h) four codes at a time, shared by
// every kernel that reads whole chunks instead of calling code_at per code.
//
// A chunk is chunk_bytes(bits) / 16 blocks of 16 bytes (one block, or three
// for 3-bit codes). Take 32-bit word t (t < 4, bytes 4t .. 4t+3, little
// endian) of every block of a chunk: those 1 or 3 words hold the codes of the
// columns 16 i + 4 t + q (q < 4) of every slice i of the chunk, and
// quad_codes() turns them into one word whose byte q is the code of column
// 16 i + 4 t + q. So a thread that owns word t of each block of a chunk owns a
// fixed set of column quads, and a 16-byte load of a block serves four such
// threads (the layout's "one shift and one mask per slice", per 32 bits).
#pragma once

#include "packed_layout.h"

#include <cstdint>

namespace torchquant::layout {

// 16-byte blocks per chunk: the 32-bit words a quad decoder needs.
template <int kBits>
inline constexpr int kChunkBlocks = static_cast<int>(chunk_bytes(kBits) / 16);

// Slices (groups of 16 consecutive columns) per chunk.
template <int kBits>
inline constexpr int kChunkSlices = static_cast<int>(chunk_codes(kBits) / 16);

// `words[b]` = word t of block b of a chunk. Returns the codes of columns
// 16 i + 4 t + q of the chunk, q = 0..3, in bytes q of the result.
//
// Why one shift and one mask suffice: the code of column 16 i + j sits at
// bits [bits * i, bits * (i + 1)) of byte j (packed_layout.h), so shifting the
// whole word right by bits * i brings every byte's field to its bit 0; the bits
// that slide in from the next byte lie above the field and the mask drops
// them. 3-bit codes take their low two bits from block i / 4 and their high
// bit from block 2 the same way.
template <int kBits>
TORCHQUANT_HOST_DEVICE uint32_t quad_codes(const uint32_t* words, int i) {
  static_assert(supported_bits(kBits), "bits must be 2, 3, 4 or 8");
  if constexpr (kBits == 3) {
    const uint32_t low = (words[i >> 2] >> (2 * (i & 3))) & 0x03030303u;
    const uint32_t high = (words[2] >> i) & 0x01010101u;
    return low | (high << 2);
  } else if constexpr (kBits == 8) {
    (void)i;  // one slice
    return words[0];
  } else {
    return (words[0] >> (kBits * i)) & (0x01010101u * ((1u << kBits) - 1u));
  }
}

// Code q (< 4) of a quad_codes() word.
TORCHQUANT_HOST_DEVICE uint32_t quad_code(uint32_t quad, int q) {
  return (quad >> (8 * q)) & 0xFFu;
}

// Code q of a quad as a float, exactly. On the GPU an integer-to-float
// conversion is a slow instruction (a quarter of the FMA rate), so the code
// is written into the mantissa of 2^23 (one byte permute) and 2^23 is
// subtracted: 2^23 + u is exact for u < 2^23, and so is the difference.
TORCHQUANT_HOST_DEVICE float quad_code_float(uint32_t quad, int q) {
#if defined(__CUDA_ARCH__)
  // Result bytes: code byte q, 0x00, 0x00, 0x4B -> the float 2^23 + code.
  const uint32_t bits = __byte_perm(quad, 0x4B000000u, 0x7540u | static_cast<uint32_t>(q));
  return __uint_as_float(bits) - 8388608.0f;
#else
  return static_cast<float>(quad_code(quad, q));
#endif
}

}  // namespace torchquant::layout
