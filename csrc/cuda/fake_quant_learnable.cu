// CUDA kernel of the learnable (LSQ / LSQ+) fake-quantize backward: writes
// dx and reduces the per-element scale and zero-point terms of every channel
// into a small tensor of partial sums, [2, A, channels, B], that the shared
// op code sums over dims 1 and 3. Input and grad_output are read once and
// nothing the size of the input is allocated.
//
// Two work decompositions; the host takes the one that leaves fewer partial
// sums. The choice and every summation order depend only on the shape and
// dtype (not on the grid size, the number of SMs or the tensor's alignment)
// and no atomics are used, so repeated runs give bit-identical sums.
//
// Pieces: each run of `inner` consecutive elements of one channel (the whole
//   tensor per-tensor, one group per-group, one slice per-channel on a
//   leading dim) is cut into pieces. A team of W lanes (a power of two up to
//   a warp, just wide enough for a run) reduces one piece: each lane sums its
//   16-byte packs in registers, then the team adds its lanes with a shuffle
//   tree and lane 0 writes one partial per piece:
//   [2, outer, channels, pieces_per_run].
// Columns: for short runs and many rows (per-channel on the last dim, where
//   inner == 1) the input is viewed as [outer rows, channels * inner
//   columns]. A block of 8 x 32 threads owns 32 columns x 256 rows: every
//   thread sums one column over every 8th row (a warp reads 32 consecutive
//   elements of a row), then the 8 row lanes are added through shared memory:
//   [2, row_blocks, channels, inner].
#include "fake_quant_cuda.h"
#include "kernel_utils.cuh"

#include "../dispatch.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

namespace torchquant::cuda {
namespace {

// Packs each lane of a team reduces per piece; bounds the number of pieces
// (and so of partial sums) to about one per 2048 float / 4096 half elements.
constexpr int64_t kPacksPerLane = 16;
// Columns decomposition: block shape and the rows one block reduces.
constexpr int kColumnsPerBlock = kWarpSize;
constexpr int kRowLanes = kBlockThreads / kColumnsPerBlock;
constexpr int64_t kRowsPerBlock = 256;
// Grid y-dimension limit of CUDA; further row blocks are looped over.
constexpr int64_t kMaxGridY = 65535;

__device__ __forceinline__ LearnableGrads<float> grads_or_nan(float x, float dy,
                                                              const ChannelGrid& g) {
  if (!g.valid) return LearnableGrads<float>{CUDART_NAN_F, CUDART_NAN_F, CUDART_NAN_F};
  return learnable_grads(x, dy, g.grid);
}

// Sum of v over the `width` lanes of each team, in lane 0 of the team. Every
// lane of the warp must call it.
__device__ __forceinline__ float team_sum(float v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset, width);
  }
  return v;
}

// ---------------------------------------------------------------------------
// Pieces

struct PiecePlan {
  int team_width;          // lanes reducing one piece: a power of two <= 32
  int64_t piece_len;       // elements per piece; a run's last piece may be shorter
  int64_t pieces_per_run;
  int64_t pieces;          // outer * channels * pieces_per_run
};

template <typename scalar_t>
PiecePlan plan_pieces(const ChannelLayout& l) {
  constexpr int N = kPackSize<scalar_t>;
  const int64_t packs_per_run = ceil_div(l.inner, N);
  int width = 1;
  while (width < kWarpSize && width < packs_per_run) width *= 2;
  const int64_t piece_len = min_i64(l.inner, width * N * kPacksPerLane);
  const int64_t pieces_per_run = ceil_div(l.inner, piece_len);
  return PiecePlan{width, piece_len, pieces_per_run, l.outer * l.channels * pieces_per_run};
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    learnable_pieces_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                            scalar_t* __restrict__ dx, float* __restrict__ partial,
                            int64_t inner, int64_t channels, ChannelGrids grids,
                            PiecePlan plan) {
  constexpr int N = kPackSize<scalar_t>;
  const int width = plan.team_width;
  const int lane = static_cast<int>(threadIdx.x) % width;
  const int teams_per_block = kBlockThreads / width;
  const int64_t lane_step = static_cast<int64_t>(width) * N;
  const int64_t team_stride = static_cast<int64_t>(gridDim.x) * teams_per_block;

  // The loop bound is the same for the whole block, so all lanes of a warp
  // reach the shuffles of team_sum together.
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * teams_per_block; first < plan.pieces;
       first += team_stride) {
    const int64_t piece = first + static_cast<int>(threadIdx.x) / width;
    float sum_scale = 0.0f;
    float sum_zero = 0.0f;
    if (piece < plan.pieces) {
      const int64_t run = piece / plan.pieces_per_run;
      const int64_t run_begin = run * inner;
      const int64_t begin = run_begin + (piece - run * plan.pieces_per_run) * plan.piece_len;
      const int64_t end = min_i64(begin + plan.piece_len, run_begin + inner);
      const ChannelGrid g = grids.at(run % channels);
      for (int64_t i = begin + static_cast<int64_t>(lane) * N; i < end; i += lane_step) {
        const int count = static_cast<int>(min_i64(N, end - i));
        const bool vector = count == N && is_aligned16(x + i) && is_aligned16(dy + i) &&
                            is_aligned16(dx + i);
        float xv[N];
        float dv[N];
        float out[N];
        load_as_float(x + i, count, vector, xv);
        load_as_float(dy + i, count, vector, dv);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const LearnableGrads<float> gr = grads_or_nan(xv[k], dv[k], g);
          out[k] = gr.dx;
          if (k < count) {
            sum_scale += gr.dscale;
            sum_zero += gr.dzero;
          }
        }
        store_from_float(dx + i, count, vector, out);
      }
    }
    sum_scale = team_sum(sum_scale, width);
    sum_zero = team_sum(sum_zero, width);
    if (piece < plan.pieces && lane == 0) {
      partial[piece] = sum_scale;
      partial[plan.pieces + piece] = sum_zero;
    }
  }
}

template <typename scalar_t>
at::Tensor launch_pieces(const FakeQuantArgs& a, const PiecePlan& plan, const scalar_t* x,
                         const scalar_t* dy, scalar_t* dx, cudaStream_t stream) {
  const ChannelLayout l = a.layout;
  at::Tensor partial = at::empty({2, l.outer, l.channels, plan.pieces_per_run}, a.scale.options());
  const unsigned int blocks =
      grid_stride_blocks(plan.pieces, kBlockThreads / plan.team_width, kBlockThreads);
  learnable_pieces_kernel<scalar_t><<<blocks, kBlockThreads, 0, stream>>>(
      x, dy, dx, partial.mutable_data_ptr<float>(), l.inner, l.channels, channel_grids(a), plan);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial;
}

// ---------------------------------------------------------------------------
// Columns

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    learnable_columns_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                             scalar_t* __restrict__ dx, float* __restrict__ partial, int64_t rows,
                             int64_t row_len, int64_t inner, int64_t row_blocks,
                             ChannelGrids grids) {
  __shared__ float lane_sums[2][kRowLanes][kColumnsPerBlock];
  const int64_t column = static_cast<int64_t>(blockIdx.x) * kColumnsPerBlock + threadIdx.x;
  const bool in_row = column < row_len;
  const ChannelGrid g = in_row ? grids.at(column / inner) : ChannelGrid{};

  // Same trip count for the whole block, so the barriers are reached by all.
  for (int64_t rb = blockIdx.y; rb < row_blocks; rb += gridDim.y) {
    float sum_scale = 0.0f;
    float sum_zero = 0.0f;
    if (in_row) {
      const int64_t row_end = min_i64(rows, (rb + 1) * kRowsPerBlock);
      for (int64_t r = rb * kRowsPerBlock + threadIdx.y; r < row_end; r += kRowLanes) {
        const int64_t i = r * row_len + column;
        const LearnableGrads<float> gr =
            grads_or_nan(static_cast<float>(x[i]), static_cast<float>(dy[i]), g);
        dx[i] = static_cast<scalar_t>(gr.dx);
        sum_scale += gr.dscale;
        sum_zero += gr.dzero;
      }
    }
    lane_sums[0][threadIdx.y][threadIdx.x] = sum_scale;
    lane_sums[1][threadIdx.y][threadIdx.x] = sum_zero;
    __syncthreads();
    // Row lane 0 finishes the scale sums, row lane 1 the zero-point sums.
    if (threadIdx.y < 2 && in_row) {
      float total = 0.0f;
#pragma unroll
      for (int k = 0; k < kRowLanes; ++k) total += lane_sums[threadIdx.y][k][threadIdx.x];
      partial[(threadIdx.y * row_blocks + rb) * row_len + column] = total;
    }
    __syncthreads();
  }
}

struct ColumnPlan {
  int64_t row_len;     // channels * inner
  int64_t row_blocks;
  int64_t column_blocks;
  // Partial sums per term, or int64 max where the grid cannot be launched.
  int64_t partials;
};

ColumnPlan plan_columns(const ChannelLayout& l) {
  ColumnPlan plan;
  plan.row_len = l.channels * l.inner;
  plan.row_blocks = ceil_div(l.outer, kRowsPerBlock);
  plan.column_blocks = ceil_div(plan.row_len, kColumnsPerBlock);
  const bool launchable = plan.column_blocks <= std::numeric_limits<int32_t>::max();
  plan.partials = launchable ? plan.row_blocks * plan.row_len
                             : std::numeric_limits<int64_t>::max();
  return plan;
}

template <typename scalar_t>
at::Tensor launch_columns(const FakeQuantArgs& a, const ColumnPlan& plan, const scalar_t* x,
                          const scalar_t* dy, scalar_t* dx, cudaStream_t stream) {
  const ChannelLayout l = a.layout;
  at::Tensor partial = at::empty({2, plan.row_blocks, l.channels, l.inner}, a.scale.options());
  const dim3 block(kColumnsPerBlock, kRowLanes);
  const dim3 grid(static_cast<unsigned int>(plan.column_blocks),
                  static_cast<unsigned int>(min_i64(plan.row_blocks, kMaxGridY)));
  learnable_columns_kernel<scalar_t><<<grid, block, 0, stream>>>(
      x, dy, dx, partial.mutable_data_ptr<float>(), l.outer, plan.row_len, l.inner,
      plan.row_blocks, channel_grids(a));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial;
}

}  // namespace

at::Tensor learnable_backward(const FakeQuantArgs& args, const at::Tensor& grad_output,
                              at::Tensor& grad_input) {
  const c10::cuda::CUDAGuard guard(args.input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor partial;
  TORCHQUANT_DISPATCH_FLOAT_TYPES(
      args.input.scalar_type(), "torchquant_fake_quantize_learnable_backward_cuda", [&] {
        const scalar_t* x = args.input.const_data_ptr<scalar_t>();
        const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
        scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
        const PiecePlan pieces = plan_pieces<scalar_t>(args.layout);
        const ColumnPlan columns = plan_columns(args.layout);
        partial = columns.partials < pieces.pieces
            ? launch_columns<scalar_t>(args, columns, x, dy, dx, stream)
            : launch_pieces<scalar_t>(args, pieces, x, dy, dx, stream);
      });
  return partial;
}

}  // namespace torchquant::cuda
