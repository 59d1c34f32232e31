// Building blocks shared by the CUDA fake-quantize kernels: per-channel
// quantization grids read on the device, 16-byte packed loads and stores
// converted to float, and launch sizing.
#pragma once

#include "../fake_quant_args.h"
#include "../quant_math.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>
#include <limits>

namespace torchquant::cuda {

constexpr int kBlockThreads = 256;
constexpr int kWarpSize = 32;

// Elements of one 16-byte memory transaction: 4 float, 8 half / bfloat16.
template <typename scalar_t>
constexpr int kPackSize = 16 / static_cast<int>(sizeof(scalar_t));

C10_HOST_DEVICE inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------
// Quantization grids

// The grid of one channel and whether it is usable (see fake_quant_cuda.h:
// unusable grids turn the channel's outputs into NaN).
struct ChannelGrid {
  QuantGrid<float> grid;
  bool valid;
};

// Device view of the per-channel scale and (rounded) zero-point of
// FakeQuantArgs.
struct ChannelGrids {
  const float* scale;
  const float* zero;
  float quant_min;
  float quant_max;

  __device__ __forceinline__ ChannelGrid at(int64_t c) const {
    const float s = __ldg(scale + c);
    const float z = __ldg(zero + c);
    // Comparisons with NaN are false, so a NaN zero-point is invalid too.
    const bool valid = valid_scale(s) && z >= quant_min && z <= quant_max;
    // Same inverse as the CPU kernels (IEEE division, not a fast reciprocal).
    return ChannelGrid{QuantGrid<float>{s, 1.0f / s, z, quant_min, quant_max}, valid};
  }
};

inline ChannelGrids channel_grids(const FakeQuantArgs& a) {
  return ChannelGrids{a.scale.const_data_ptr<float>(), a.zero.const_data_ptr<float>(),
                      a.quant_min, a.quant_max};
}

// Walks the channel of consecutive elements of the [outer, channels, inner]
// view with two divisions for the first element and none after it.
// index_t is uint32_t where the tensor allows it (see with_index_type).
template <typename index_t>
struct ChannelCursor {
  index_t channel;
  index_t left_in_run;  // elements from the current one to the end of its run

  __device__ __forceinline__ ChannelCursor(index_t i, index_t inner, index_t channels) {
    const index_t run = i / inner;
    channel = run % channels;
    left_in_run = inner - (i - run * inner);
  }

  __device__ __forceinline__ void advance(index_t inner, index_t channels) {
    if (--left_in_run == 0) {
      left_in_run = inner;
      if (++channel == channels) channel = 0;
    }
  }
};

// Calls fn(index_t{}) with uint32_t when every element index (plus a pack of
// slack) fits in 32 bits, else with int64_t: 64-bit integer division is a long
// instruction sequence on GPUs, several times the 32-bit one.
template <typename Fn>
void with_index_type(int64_t numel, const Fn& fn) {
  if (numel <= std::numeric_limits<int32_t>::max()) {
    fn(uint32_t{0});
  } else {
    fn(int64_t{0});
  }
}

// ---------------------------------------------------------------------------
// Packed memory access

// N elements with the alignment of one vector transaction.
template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) RawPack {
  scalar_t v[N];
};

__device__ __forceinline__ bool is_aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Loads `count` (<= N) elements from p as float. `vector` (a full, aligned
// pack) selects one 16-byte load; otherwise elements are read one by one and
// the missing ones are 0. Both paths give the same values, so the order of
// any later reduction does not depend on the alignment of the tensor.
template <int N, typename scalar_t>
__device__ __forceinline__ void load_as_float(const scalar_t* p, int count, bool vector,
                                              float (&out)[N]) {
  if (vector) {
    const RawPack<scalar_t, N> raw = *reinterpret_cast<const RawPack<scalar_t, N>*>(p);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = static_cast<float>(raw.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = k < count ? static_cast<float>(p[k]) : 0.0f;
  }
}

// Stores the first `count` values of `in` to p, converted to scalar_t.
template <int N, typename scalar_t>
__device__ __forceinline__ void store_from_float(scalar_t* p, int count, bool vector,
                                                 const float (&in)[N]) {
  if (vector) {
    RawPack<scalar_t, N> raw;
#pragma unroll
    for (int k = 0; k < N; ++k) raw.v[k] = static_cast<scalar_t>(in[k]);
    *reinterpret_cast<RawPack<scalar_t, N>*>(p) = raw;
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (k < count) p[k] = static_cast<scalar_t>(in[k]);
    }
  }
}

// ---------------------------------------------------------------------------
// Launch sizing

// Blocks of `threads` threads that the current device keeps resident at once:
// grid-stride kernels launch at most this many and loop over the rest.
inline int64_t resident_blocks(int threads) {
  const int device = c10::cuda::current_device();
  int sms = 0;
  int threads_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  return static_cast<int64_t>(sms) * (threads_per_sm / threads);
}

// Grid size for `work_items` items handled `items_per_block` at a time.
inline unsigned int grid_stride_blocks(int64_t work_items, int64_t items_per_block,
                                       int threads) {
  const int64_t wanted = ceil_div(work_items, items_per_block);
  return static_cast<unsigned int>(min_i64(wanted, resident_blocks(threads)));
}

}  // namespace torchquant::cuda
