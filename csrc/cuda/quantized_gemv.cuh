// GEMV kernel of quantized_linear for small M (decode): y = x W^T read from the
// packed weight once, decoded in registers. The kernel templates live here;
// quantized_gemv_bits{2,3,4,8}.cu instantiate them, one bit width per file so
// that a parallel build compiles them side by side, and quantized_gemv.cu
// launches them.
//
// Work split. A block owns kRows rows of W and all of K. Thread t of every
// group of four threads owns 32-bit word t of each 16-byte block of a chunk
// (chunk_decode.h), i.e. the column quads 16 i + 4 t + [0, 4) of every slice i,
// and the block's chunk groups stride over the row. So
//  * a warp's weight loads cover 128 contiguous bytes of a row (fully
//    coalesced), and each thread issues the loads of its next chunk before it
//    decodes the current one, keeping bytes in flight;
//  * the activations of a quad are one 16-byte load, and the four threads of a
//    chunk read 64 contiguous bytes: the x rows (reused by every block) stay
//    in L1, while the weight loads bypass it;
//  * a code is decoded once (a byte permute and a subtraction, chunk_decode.h)
//    for the multiply-adds of all kM activation rows.
// Zero points and scales are folded once per chunk (or per 16-column slice when
// the group size is not a multiple of the chunk): acc = sum v x and sx = sum x
// over the fold unit, then y += s (acc - z sx). That is the same sum as
// sum (v - z) s x, rounded differently, and costs one add per activation
// value (shared by the block's rows) instead of a subtraction per code.
// The partial sums of the block are added in a fixed order (block_sum):
// results do not change from run to run.
#pragma once

#include "gemv_common.cuh"

#include "../runtime/chunk_decode.h"

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace torchquant::cuda::gemv {

// Rows of W per block: each activation load and each activation sum serves
// this many rows; more rows would cost registers at kM = 8.
constexpr int kRows = 4;
// Threads sharing one chunk: thread t reads word t of each 16-byte block.
constexpr int kThreadsPerChunk = 4;
// Activation rows per launch at most (the kM template argument).
constexpr int kMaxM = 8;

struct GemvArgs {
  const uint8_t* packed;  // [n, row_bytes]
  const float* scales;    // [n, groups]
  const float* zeros;     // [n, groups]
  const float* lut;       // [16], or nullptr
  const float* x;         // [m, kp], 16-byte aligned
  const float* bias;      // [n], or nullptr
  float* y;               // [m, n]
  int m;                  // activation rows of this launch, 1..kMaxM
  int n;
  int kp;                 // padded in_features: the row stride of x
  int chunks;             // chunks per row of W
  int row_bytes;
  int groups;
  int units_per_group;    // fold units (chunks, or slices with kSliceFold) per group
};

// Value of code q of a quad: the code itself, or its lookup-table entry.
template <bool kLut>
__device__ __forceinline__ float code_value(uint32_t quad, int q, const float* lut) {
  if constexpr (kLut) {
    // The byte offset 4 u of entry u, in one byte permute of the pre-shifted
    // quad (4-bit codes: 4 u < 256 stays inside its byte).
    const uint32_t offset = __byte_perm(quad << 2, 0u, 0x4440u | static_cast<uint32_t>(q));
    return *reinterpret_cast<const float*>(reinterpret_cast<const char*>(lut) + offset);
  } else {
    (void)lut;
    return layout::quad_code_float(quad, q);
  }
}

// Word t of every 16-byte block of chunk c of each of the block's rows.
template <int kBits>
__device__ __forceinline__ void load_chunk(const GemvArgs& a, const int (&rows)[kRows], int c,
                                           int t,
                                           uint32_t (&w)[kRows][layout::kChunkBlocks<kBits>]) {
  constexpr int kBytes = static_cast<int>(layout::chunk_bytes(kBits));
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const uint8_t* p = a.packed + static_cast<int64_t>(rows[r]) * a.row_bytes +
                       static_cast<int64_t>(c) * kBytes + 4 * t;
#pragma unroll
    for (int b = 0; b < layout::kChunkBlocks<kBits>; ++b) w[r][b] = load_stream_u32(p + 16 * b);
  }
}

// y[m][r] += s (acc - z sx) with the scale and zero point of group `group`.
template <int kM>
__device__ __forceinline__ void fold(const GemvArgs& a, const int (&rows)[kRows], int group,
                                     float (&acc)[kM][kRows], float (&sx)[kM],
                                     float (&y)[kM][kRows]) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t g = static_cast<int64_t>(rows[r]) * a.groups + group;
    const float s = __ldg(a.scales + g);
    const float z = __ldg(a.zeros + g);
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      y[m][r] = __fmaf_rn(s, __fmaf_rn(-z, sx[m], acc[m][r]), y[m][r]);
      acc[m][r] = 0.0f;
    }
  }
#pragma unroll
  for (int m = 0; m < kM; ++m) sx[m] = 0.0f;
}

// The group of a fold unit (a chunk, or with kSliceFold a slice) as a quotient
// and remainder by units_per_group, advanced by additions: an integer division
// by a run-time value costs about as much as decoding a chunk.
struct GroupCursor {
  int group;
  int rest;  // fold units of `group` before this one

  __device__ __forceinline__ void advance(int units, int units_per_group) {
    // rest < units_per_group and units <= units_per_group: one wrap at most.
    rest += units;
    if (rest >= units_per_group) {
      rest -= units_per_group;
      ++group;
    }
  }
};

// Adds chunk c of the block's rows, times the activations, to y; `at` is the
// group cursor of the chunk's first fold unit.
template <int kBits, int kM, bool kLut, bool kSliceFold>
__device__ __forceinline__ void chunk_dot(const GemvArgs& a, const int (&rows)[kRows], int c,
                                          int t,
                                          const uint32_t (&w)[kRows][layout::kChunkBlocks<kBits>],
                                          const float* lut, GroupCursor at,
                                          float (&y)[kM][kRows]) {
  constexpr int kCodes = static_cast<int>(layout::chunk_codes(kBits));
  float acc[kM][kRows] = {};
  float sx[kM] = {};
  const int col = c * kCodes + 4 * t;  // first column of this thread's quad in slice 0
#pragma unroll
  for (int i = 0; i < layout::kChunkSlices<kBits>; ++i) {
    float v[kRows][4];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const uint32_t quad = layout::quad_codes<kBits>(w[r], i);
#pragma unroll
      for (int q = 0; q < 4; ++q) v[r][q] = code_value<kLut>(quad, q, lut);
    }
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      // Rows past a.m repeat the last one; their results are dropped.
      const int xm = m < a.m ? m : a.m - 1;
      const float4 xv = __ldg(
          reinterpret_cast<const float4*>(a.x + static_cast<int64_t>(xm) * a.kp + col + 16 * i));
      sx[m] += (xv.x + xv.y) + (xv.z + xv.w);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float s = acc[m][r];
        s = __fmaf_rn(v[r][0], xv.x, s);
        s = __fmaf_rn(v[r][1], xv.y, s);
        s = __fmaf_rn(v[r][2], xv.z, s);
        acc[m][r] = __fmaf_rn(v[r][3], xv.w, s);
      }
    }
    if constexpr (kSliceFold) {
      // Slices past K (zero activations, so a zero contribution) are folded
      // with the last group rather than reading past the row's scales.
      fold<kM>(a, rows, at.group < a.groups ? at.group : a.groups - 1, acc, sx, y);
      at.advance(1, a.units_per_group);
    }
  }
  if constexpr (!kSliceFold) fold<kM>(a, rows, at.group, acc, sx, y);
}

template <int kBits, int kM, bool kLut, bool kSliceFold>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(const GemvArgs a) {
  constexpr int kBlocks = layout::kChunkBlocks<kBits>;
  __shared__ float lut[16];
  __shared__ float partial[kGemvThreads / 32][kM * kRows];
  if constexpr (kLut) {
    if (threadIdx.x < 16) lut[threadIdx.x] = __ldg(a.lut + threadIdx.x);
    __syncthreads();
  }

  // The block's rows; past the last row of W the last one is read again (its
  // results are dropped), so no load needs a condition.
  int rows[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int n = static_cast<int>(blockIdx.x) * kRows + r;
    rows[r] = n < a.n ? n : a.n - 1;
  }
  const int t = static_cast<int>(threadIdx.x) % kThreadsPerChunk;
  const int step = static_cast<int>(blockDim.x) / kThreadsPerChunk;

  float y[kM][kRows] = {};
  uint32_t w[kRows][kBlocks] = {};
  int c = static_cast<int>(threadIdx.x) / kThreadsPerChunk;
  // Fold units per chunk, and the cursor's step per iteration as whole groups
  // plus a remainder: two divisions per thread instead of one per chunk.
  constexpr int kUnits = kSliceFold ? layout::kChunkSlices<kBits> : 1;
  const int upg = a.units_per_group;
  GroupCursor at{(c * kUnits) / upg, (c * kUnits) % upg};
  const int step_groups = (step * kUnits) / upg, step_rest = (step * kUnits) % upg;
  if (c < a.chunks) load_chunk<kBits>(a, rows, c, t, w);
  for (; c < a.chunks; c += step) {
    // The next chunk's loads are issued before this one is decoded.
    uint32_t next[kRows][kBlocks] = {};
    if (c + step < a.chunks) load_chunk<kBits>(a, rows, c + step, t, next);
    chunk_dot<kBits, kM, kLut, kSliceFold>(a, rows, c, t, w, lut, at, y);
    at.group += step_groups;
    at.advance(step_rest, upg);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int b = 0; b < kBlocks; ++b) w[r][b] = next[r][b];
    }
  }

  float flat[kM * kRows];
#pragma unroll
  for (int m = 0; m < kM; ++m) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) flat[m * kRows + r] = y[m][r];
  }
  const float total = block_sum(flat, partial);
  if (static_cast<int>(threadIdx.x) < kM * kRows) {
    const int m = static_cast<int>(threadIdx.x) / kRows;
    const int n = static_cast<int>(blockIdx.x) * kRows + static_cast<int>(threadIdx.x) % kRows;
    if (m < a.m && n < a.n) {
      a.y[static_cast<int64_t>(m) * a.n + n] = a.bias != nullptr ? total + a.bias[n] : total;
    }
  }
}

template <int kBits, int kM, bool kLut, bool kSliceFold>
void launch(const GemvArgs& a, int threads, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned int>(ceil_div(a.n, kRows));
  gemv_kernel<kBits, kM, kLut, kSliceFold><<<blocks, threads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The smallest kM that holds a.m rows: rows past a.m cost multiply-adds.
template <int kBits, bool kLut, bool kSliceFold>
void launch_rows(const GemvArgs& a, int threads, cudaStream_t stream) {
  if (a.m <= 1) {
    launch<kBits, 1, kLut, kSliceFold>(a, threads, stream);
  } else if (a.m <= 2) {
    launch<kBits, 2, kLut, kSliceFold>(a, threads, stream);
  } else if (a.m <= 4) {
    launch<kBits, 4, kLut, kSliceFold>(a, threads, stream);
  } else {
    launch<kBits, kMaxM, kLut, kSliceFold>(a, threads, stream);
  }
}

// Launches the kernel for kBits-bit codes, y = x W^T (+ bias) for a.m <= kMaxM
// rows: the entry point that quantized_gemv_bits{kBits}.cu instantiates.
template <int kBits>
void launch_bits(const GemvArgs& a, bool lut, bool slice_fold, int threads, cudaStream_t stream) {
  if constexpr (kBits == 8) {
    // A chunk is one slice: every multiple of 16 is a multiple of the chunk.
    launch_rows<8, false, false>(a, threads, stream);
  } else if constexpr (kBits == 4) {
    if (lut) {
      if (slice_fold) launch_rows<4, true, true>(a, threads, stream);
      else launch_rows<4, true, false>(a, threads, stream);
    } else {
      if (slice_fold) launch_rows<4, false, true>(a, threads, stream);
      else launch_rows<4, false, false>(a, threads, stream);
    }
  } else {
    if (slice_fold) launch_rows<kBits, false, true>(a, threads, stream);
    else launch_rows<kBits, false, false>(a, threads, stream);
  }
  (void)lut;
}

}  // namespace torchquant::cuda::gemv
