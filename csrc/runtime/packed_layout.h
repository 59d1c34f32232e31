// The run-time layout of a low-bit weight, shared by the CPU and CUDA kernels
// and by the pack / unpack ops: the one place that says where code k of a row
// lives.
//
// A weight W [N, K] (out_features x in_features) is held as unsigned codes
// u in [0, 2^bits), one packed row of `packed_row_bytes(K, bits)` bytes per
// output channel, plus float32 scales / zero-points [N, G] (G groups of
// g = K / G consecutive input columns). The weight is
//
//     W[n, k] = (v(u[n, k]) - zeros[n, k / g]) * scales[n, k / g]
//
// with v(u) = u for integer codes and v(u) = lut[u] for a 4-bit lookup table
// (NF4 / FP4: 16 float32 levels, zeros 0).
//
// A row is a sequence of chunks. A chunk holds C codes in B bytes:
//
//   bits  C    B   code c of the chunk (c = j + 16 * i, j < 16)
//   8     16   16  byte j
//   4     32   16  byte j, bits [4i, 4i + 4)             (i < 2)
//   2     64   16  byte j, bits [2i, 2i + 2)             (i < 4)
//   3     128  48  low two bits: byte 16 * (i / 4) + j, bits [2 (i % 4), 2 (i % 4) + 2);
//                  high bit: byte 32 + j, bit i           (i < 8)
//
// So a 16-byte load of a chunk, widened to 16 lanes of 32 bits, gives codes
// j = 0..15 of every "slice" i after one shift and one mask: 16 consecutive
// columns per SIMD register (llama.cpp's Q4_0 interleave, generalised). The
// last chunk of a row is padded with zero codes; K need not be a multiple of C.
// 8-bit rows are plain bytes (u = q + 128 for signed int8 codes), which is
// also the layout the int8 x int8 (W8A8) kernels read.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TORCHQUANT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TORCHQUANT_HOST_DEVICE inline
#endif

namespace torchquant::layout {

TORCHQUANT_HOST_DEVICE constexpr bool supported_bits(int64_t bits) {
  return bits == 2 || bits == 3 || bits == 4 || bits == 8;
}

// Codes per chunk.
TORCHQUANT_HOST_DEVICE constexpr int64_t chunk_codes(int64_t bits) {
  return bits == 3 ? 128 : 128 / bits;
}

// Bytes per chunk.
TORCHQUANT_HOST_DEVICE constexpr int64_t chunk_bytes(int64_t bits) {
  return bits == 3 ? 48 : 16;
}

TORCHQUANT_HOST_DEVICE constexpr int64_t num_chunks(int64_t in_features, int64_t bits) {
  return (in_features + chunk_codes(bits) - 1) / chunk_codes(bits);
}

TORCHQUANT_HOST_DEVICE constexpr int64_t packed_row_bytes(int64_t in_features, int64_t bits) {
  return num_chunks(in_features, bits) * chunk_bytes(bits);
}

// Code k of a packed row (scalar access; the SIMD kernels decode whole chunks).
TORCHQUANT_HOST_DEVICE uint32_t code_at(const uint8_t* row, int64_t k, int64_t bits) {
  const int64_t chunk = k / chunk_codes(bits);
  const int64_t c = k - chunk * chunk_codes(bits);
  const uint8_t* p = row + chunk * chunk_bytes(bits);
  const int64_t j = c & 15, i = c >> 4;
  if (bits == 3) {
    const uint32_t low = (p[16 * (i >> 2) + j] >> (2 * (i & 3))) & 3u;
    const uint32_t high = (p[32 + j] >> i) & 1u;
    return low | (high << 2);
  }
  return (static_cast<uint32_t>(p[j]) >> (bits * i)) & ((1u << bits) - 1u);
}

// Writes code u (< 2^bits) at column k of a packed row whose bytes start zeroed.
TORCHQUANT_HOST_DEVICE void set_code(uint8_t* row, int64_t k, int64_t bits, uint32_t u) {
  const int64_t chunk = k / chunk_codes(bits);
  const int64_t c = k - chunk * chunk_codes(bits);
  uint8_t* p = row + chunk * chunk_bytes(bits);
  const int64_t j = c & 15, i = c >> 4;
  if (bits == 3) {
    p[16 * (i >> 2) + j] |= static_cast<uint8_t>((u & 3u) << (2 * (i & 3)));
    p[32 + j] |= static_cast<uint8_t>(((u >> 2) & 1u) << i);
    return;
  }
  p[j] |= static_cast<uint8_t>(u << (bits * i));
}

}  // namespace torchquant::layout
