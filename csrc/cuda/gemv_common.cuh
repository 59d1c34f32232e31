// Building blocks of the GEMV kernels of the run-time linear ops
// (quantized_gemv.cu, w8a8_linear.cu): streaming loads of the packed weight,
// the block-wide sum of each thread's partial outputs, and host-side
// alignment checks.
#pragma once

#include "kernel_utils.cuh"

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace torchquant::cuda {

// Threads of a GEMV block: four warps, so that the partial sums of a block
// fit one small shared-memory array and several blocks share an SM.
constexpr int kGemvThreads = 128;

// Loads of weight bytes that are read exactly once: through the read-only
// path, without allocating in L1, so that the activations (reused by every
// block on the SM) stay in L1.
__device__ __forceinline__ uint32_t load_stream_u32(const void* p) {
  uint32_t v;
  asm("ld.global.nc.L1::no_allocate.b32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ uint4 load_stream_u128(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// Sums v[j] (j < kCount) over all threads of the block (blockDim.x a multiple
// of 32, at most kGemvThreads) and returns sum j to thread j < kCount (other
// threads get 0). The order of the additions depends only on the block size,
// so the result is the same on every run. `smem` is [kGemvThreads / 32][kCount].
template <typename T, int kCount>
__device__ __forceinline__ T block_sum(T (&v)[kCount], T (*smem)[kCount]) {
#pragma unroll
  for (int j = 0; j < kCount; ++j) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      v[j] += __shfl_xor_sync(0xffffffffu, v[j], offset);
    }
  }
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  if ((threadIdx.x & 31) == 0) {
    // Lane 0 stores every value: indexing v by the lane would put v in local memory.
#pragma unroll
    for (int j = 0; j < kCount; ++j) smem[warp][j] = v[j];
  }
  __syncthreads();
  T total{};
  if (static_cast<int>(threadIdx.x) < kCount) {
    const int warps = static_cast<int>(blockDim.x) >> 5;
    for (int w = 0; w < warps; ++w) total += smem[w][threadIdx.x];
  }
  return total;
}

// Host side: whether a tensor's data can be read with 16-byte vector loads.
inline bool data_aligned16(const at::Tensor& t) {
  return (reinterpret_cast<uintptr_t>(t.const_data_ptr()) & 15u) == 0;
}

// Host side: the threads of a GEMV block whose threads each take `per_thread`
// units of a row of `units`: a multiple of 32, at most kGemvThreads, no more
// than the row needs (a short row leaves no warp idle).
inline int gemv_threads(int64_t units, int per_thread) {
  const int64_t wanted = ceil_div(units, per_thread);
  const int64_t warps = ceil_div(wanted, kWarpSize);
  return static_cast<int>(min_i64(warps, kGemvThreads / kWarpSize)) * kWarpSize;
}

}  // namespace torchquant::cuda
