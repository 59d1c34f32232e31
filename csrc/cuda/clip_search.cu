// CUDA kernel of mse_clip_search (the contract is ClipSearchKernel in
// ../clip_search.h): the L^norm error, scale and zero-point of every
// candidate grid of every row, in two launches. The first computes each
// candidate's grid (written to the scale / zero outputs) and its inverse
// scale; the second sums the errors.
//
// Work decomposition of the errors. Scoring one element against one
// candidate is about ten float operations, and there are rows x candidates
// x elements of them against rows x elements values to load: with the
// default 100 candidates that is ~1000 operations per loaded element, so the
// kernel is bound by arithmetic as long as each element comes from DRAM once
// and then serves every candidate from on-chip memory. A block per (row,
// candidate) would read each row once per candidate and count on L2 to absorb
// it; here instead
//  * a block owns a chunk of one row (the whole row up to kChunkLen elements;
//    longer rows are cut into equal chunks) and copies it once, as float,
//    into shared memory;
//  * candidates are scored in tiles of kTileCandidates whose errors a thread
//    accumulates in registers, so one shared-memory read of an element
//    serves a whole tile;
//  * the block's threads form teams of `width` lanes (a power of two). A team
//    scores one tile over the chunk, each lane taking every width-th element,
//    then adds up its lanes (shuffles, and shared memory across warps when
//    the team is wider than a warp). Teams take the tiles in rounds. The
//    host picks the width per shape: short rows (a group of 64 elements) get
//    narrow teams, so that every lane has elements to score and many tiles
//    run side by side; long rows get wide teams, up to the whole block.
//  * when there are too few (row, chunk) pairs to fill a GPU (per-tensor
//    search on a small tensor, a few channels) the tiles of a chunk are also
//    split into slices done by separate blocks, each staging the chunk again
//    (from L2: such inputs are small).
// Every error of a chunk is summed by one team in an order fixed by the
// shape alone (not by the GPU), the partial sums of a long row's chunks are
// added by ATen, and no atomics are used: repeated runs give the same bits.
#include "kernel_utils.cuh"

#include "../clip_search.h"
#include "../dispatch.h"
#include "../quant_math.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

namespace torchquant::cuda {
namespace {

// Elements of a row one block stages: 16 KiB of float shared memory, small
// enough for several blocks per SM.
constexpr int64_t kChunkLen = 4096;
// Candidates whose errors a thread accumulates in registers at once.
constexpr int kTileCandidates = 8;
// Below this many (row, chunk) pairs the tiles are sliced over more blocks:
// several waves of resident blocks on current GPUs (132 SMs on an H100).
// A constant, not the device's SM count, so the plan depends on the shape only.
constexpr int64_t kTargetBlocks = 2048;
// What a tile costs a lane besides scoring its elements (loading the tile's
// grids, the team sum), in element-scorings; used to choose the team width.
constexpr int64_t kTileOverhead = 2;

// The candidate grids of all rows, [rows, steps] each.
struct CandidateGrids {
  const float* scale;
  const float* inv_scale;
  const float* zero;
  float quant_min;
  float quant_max;

  __device__ __forceinline__ QuantGrid<float> at(int64_t i) const {
    return QuantGrid<float>{__ldg(scale + i), __ldg(inv_scale + i), __ldg(zero + i), quant_min,
                            quant_max};
  }
};

// How the error launch splits the work; depends on the shape only.
struct ErrorPlan {
  int64_t chunks;           // per row
  int64_t chunk_len;        // elements of each chunk; the row's last may be shorter
  int64_t tiles;            // ceil(steps / kTileCandidates)
  int64_t tiles_per_slice;  // tiles one block scores for its chunk
  int64_t slices;           // blocks sharing the tiles of one chunk
  int64_t items;            // rows * chunks * slices: the blocks' work items
  int team_width;
};

// The team width with the least estimated time per work item: a block needs
// ceil(tiles / teams) rounds, and a round costs a lane its elements of the
// chunk plus the fixed overhead of a tile. Ties go to the narrower team
// (fewer reduction steps).
int plan_team_width(int64_t chunk_len, int64_t tiles) {
  int best = 1;
  int64_t best_cost = std::numeric_limits<int64_t>::max();
  for (int width = 1; width <= kBlockThreads; width *= 2) {
    const int64_t rounds = ceil_div(tiles, kBlockThreads / width);
    const int64_t cost = rounds * (ceil_div(chunk_len, width) + kTileOverhead);
    if (cost < best_cost) {
      best = width;
      best_cost = cost;
    }
  }
  return best;
}

ErrorPlan plan_errors(int64_t rows, int64_t row_len, int64_t steps) {
  ErrorPlan p;
  p.chunks = std::max<int64_t>(1, ceil_div(row_len, kChunkLen));
  p.chunk_len = ceil_div(row_len, p.chunks);
  p.tiles = ceil_div(steps, kTileCandidates);
  const int64_t row_chunks = rows * p.chunks;
  const int64_t wanted_slices = std::clamp<int64_t>(ceil_div(kTargetBlocks, row_chunks), 1, p.tiles);
  // A chunk shorter than the block needs several tiles per block to give
  // every thread an element: slicing below that only adds idle threads.
  const int64_t min_tiles_per_slice =
      ceil_div(kBlockThreads, std::clamp<int64_t>(p.chunk_len, 1, kBlockThreads));
  p.tiles_per_slice =
      std::min(p.tiles, std::max(ceil_div(p.tiles, wanted_slices), min_tiles_per_slice));
  p.slices = ceil_div(p.tiles, p.tiles_per_slice);
  p.items = row_chunks * p.slices;
  p.team_width = plan_team_width(p.chunk_len, p.tiles_per_slice);
  return p;
}

__global__ void __launch_bounds__(kBlockThreads)
    candidate_grids_kernel(const float* __restrict__ lo, const float* __restrict__ hi,
                           int64_t rows, int64_t steps, float max_shrink, float quant_min,
                           float quant_max, bool symmetric, float* __restrict__ scale,
                           float* __restrict__ inv_scale, float* __restrict__ zero) {
  const int64_t total = rows * steps;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += stride) {
    const int64_t row = t / steps;
    const float shrink = candidate_shrink(t - row * steps, steps, max_shrink);
    float s;
    float z;
    grid_from_range(lo[row] * shrink, hi[row] * shrink, quant_min, quant_max, symmetric,
                    kMinScale, &s, &z);
    scale[t] = s;
    // IEEE division, as the CPU kernel computes the inverse.
    inv_scale[t] = 1.0f / s;
    zero[t] = z;
  }
}

// |d|^norm; the square is |d| * |d| bit for bit.
template <bool kSquared>
__device__ __forceinline__ float error_term(float d, float norm) {
  if constexpr (kSquared) {
    return d * d;
  } else {
    return powf(fabsf(d), norm);
  }
}

// Adds v over the `width` lanes of each team into the team's lane 0. Every
// thread of the block must call it: teams wider than a warp meet at
// __syncthreads. `scratch` holds kTileCandidates floats per warp.
template <int C>
__device__ __forceinline__ void team_sum(float (&v)[C], int width, float* scratch) {
  const int warp_width = width < kWarpSize ? width : kWarpSize;
  for (int offset = warp_width / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int c = 0; c < C; ++c) v[c] += __shfl_down_sync(0xffffffffu, v[c], offset, warp_width);
  }
  if (width <= kWarpSize) return;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) {
#pragma unroll
    for (int c = 0; c < C; ++c) scratch[warp * C + c] = v[c];
  }
  __syncthreads();
  if (threadIdx.x % width == 0) {
    for (int w = 1; w < width / kWarpSize; ++w) {
#pragma unroll
      for (int c = 0; c < C; ++c) v[c] += scratch[(warp + w) * C + c];
    }
  }
  __syncthreads();  // scratch is written again by the next call
}

// partial[row, chunk, k] = sum over the chunk of |fake_quantize(x) - x|^norm
// on candidate k's grid. Dynamic shared memory: plan.chunk_len floats for the
// chunk, then kTileCandidates floats per warp for team_sum.
template <typename scalar_t, bool kSquared>
__global__ void __launch_bounds__(kBlockThreads)
    candidate_errors_kernel(const scalar_t* __restrict__ rows, int64_t row_len,
                            CandidateGrids grids, int64_t steps, float norm, ErrorPlan plan,
                            float* __restrict__ partial) {
  constexpr int C = kTileCandidates;
  extern __shared__ float shared[];
  float* const values = shared;
  float* const scratch = shared + plan.chunk_len;
  const int width = plan.team_width;
  const int team = static_cast<int>(threadIdx.x) / width;
  const int lane = static_cast<int>(threadIdx.x) % width;
  const int teams = kBlockThreads / width;

  for (int64_t item = blockIdx.x; item < plan.items; item += gridDim.x) {
    const int64_t row_chunk = item / plan.slices;
    const int64_t slice = item - row_chunk * plan.slices;
    const int64_t row = row_chunk / plan.chunks;
    const int64_t begin = (row_chunk - row * plan.chunks) * plan.chunk_len;
    const int len = static_cast<int>(min_i64(plan.chunk_len, row_len - begin));
    const scalar_t* x = rows + row * row_len + begin;
    for (int i = static_cast<int>(threadIdx.x); i < len; i += kBlockThreads) {
      values[i] = static_cast<float>(x[i]);
    }
    __syncthreads();

    const int64_t first_tile = slice * plan.tiles_per_slice;
    const int64_t end_tile = min_i64(first_tile + plan.tiles_per_slice, plan.tiles);
    // The same trip count for the whole block, so every thread reaches the
    // barriers of team_sum.
    for (int64_t round_start = first_tile; round_start < end_tile; round_start += teams) {
      const int64_t tile = round_start + team;
      const bool active = tile < end_tile;
      float err[C] = {};
      if (active) {
        // A tile past the last candidate repeats the last one's grid; its
        // errors are not written.
        QuantGrid<float> g[C];
#pragma unroll
        for (int c = 0; c < C; ++c) g[c] = grids.at(row * steps + min_i64(tile * C + c, steps - 1));
        for (int i = lane; i < len; i += width) {
          const float v = values[i];
#pragma unroll
          for (int c = 0; c < C; ++c) {
            err[c] += error_term<kSquared>(fake_quantize_value(v, g[c]) - v, norm);
          }
        }
      }
      team_sum(err, width, scratch);
      if (active && lane == 0) {
        float* out = partial + row_chunk * steps;
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const int64_t k = tile * C + c;
          if (k < steps) out[k] = err[c];
        }
      }
    }
    __syncthreads();  // the chunk's values are read up to here
  }
}

template <typename scalar_t, bool kSquared>
void launch_errors(const ClipSearchArgs& a, const ErrorPlan& plan, CandidateGrids grids,
                   at::Tensor& partial, cudaStream_t stream) {
  const int64_t row_len = a.rows.size(1);
  const size_t shared_bytes =
      static_cast<size_t>(plan.chunk_len + kBlockThreads / kWarpSize * kTileCandidates) *
      sizeof(float);
  const auto blocks = static_cast<unsigned int>(
      min_i64(plan.items, std::numeric_limits<int32_t>::max()));
  candidate_errors_kernel<scalar_t, kSquared><<<blocks, kBlockThreads, shared_bytes, stream>>>(
      a.rows.const_data_ptr<scalar_t>(), row_len, grids, a.steps, a.norm, plan,
      partial.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void clip_search(const ClipSearchArgs& a, at::Tensor& err, at::Tensor& scale, at::Tensor& zero) {
  const int64_t rows = a.rows.size(0);
  const int64_t row_len = a.rows.size(1);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(a.rows.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor inv_scale = at::empty_like(scale);
  const int64_t candidates = rows * a.steps;
  candidate_grids_kernel<<<grid_stride_blocks(candidates, kBlockThreads, kBlockThreads),
                           kBlockThreads, 0, stream>>>(
      a.lo.const_data_ptr<float>(), a.hi.const_data_ptr<float>(), rows, a.steps, a.max_shrink,
      a.quant_min, a.quant_max, a.symmetric, scale.mutable_data_ptr<float>(),
      inv_scale.mutable_data_ptr<float>(), zero.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const ErrorPlan plan = plan_errors(rows, row_len, a.steps);
  const CandidateGrids grids{scale.const_data_ptr<float>(), inv_scale.const_data_ptr<float>(),
                             zero.const_data_ptr<float>(), a.quant_min, a.quant_max};
  // With one chunk per row the partial sums are the errors themselves.
  at::Tensor partial =
      plan.chunks == 1 ? err : at::empty({rows, plan.chunks, a.steps}, err.options());
  TORCHQUANT_DISPATCH_FLOAT_TYPES(a.rows.scalar_type(), "torchquant_mse_clip_search_cuda", [&] {
    if (a.norm == 2.0f) {
      launch_errors<scalar_t, true>(a, plan, grids, partial, stream);
    } else {
      launch_errors<scalar_t, false>(a, plan, grids, partial, stream);
    }
  });
  if (plan.chunks > 1) {
    at::sum_out(err, partial, 1);
  }
}

}  // namespace torchquant::cuda
