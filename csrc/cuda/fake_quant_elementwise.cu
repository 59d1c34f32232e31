// CUDA kernels of the fake-quantize forward and of its straight-through
// backward: one elementwise map over the [outer, channels, inner] view.
//
// Each thread handles packs of 16 bytes (4 float or 8 half / bfloat16
// elements) in a grid-stride loop, with one vector load per tensor when the
// pack is whole and aligned. The channel of each element follows from a
// cursor started once per pack, and a thread reloads the channel's grid only
// when the channel changes (once per thread for per-tensor quantization).
#include "fake_quant_cuda.h"
#include "kernel_utils.cuh"

#include "../dispatch.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace torchquant::cuda {
namespace {

struct ForwardOp {
  static constexpr bool kReadsGrad = false;
  __device__ float operator()(float x, float /*dy*/, const QuantGrid<float>& g) const {
    return fake_quantize_value(x, g);
  }
};

struct SteBackwardOp {
  static constexpr bool kReadsGrad = true;
  __device__ float operator()(float x, float dy, const QuantGrid<float>& g) const {
    return ste_grad(x, dy, g);
  }
};

// y[i] = op(x[i], dy[i], grid of element i); dy is read only when the op
// needs it.
template <typename scalar_t, typename index_t, typename Op>
__global__ void __launch_bounds__(kBlockThreads)
    map_channels_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                        scalar_t* __restrict__ y, index_t numel, index_t inner,
                        index_t channels, ChannelGrids grids, Op op) {
  constexpr int N = kPackSize<scalar_t>;
  const index_t packs = (numel + N - 1) / N;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;

  index_t loaded_channel = channels;  // none yet
  ChannelGrid g{};
  for (index_t p = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += stride) {
    const index_t i = p * N;
    const int count = numel - i < N ? static_cast<int>(numel - i) : N;
    bool vector = count == N && is_aligned16(x + i) && is_aligned16(y + i);
    if constexpr (Op::kReadsGrad) vector = vector && is_aligned16(dy + i);

    float xv[N];
    float dv[N] = {};
    float out[N];
    load_as_float(x + i, count, vector, xv);
    if constexpr (Op::kReadsGrad) load_as_float(dy + i, count, vector, dv);

    ChannelCursor<index_t> cursor(i, inner, channels);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (cursor.channel != loaded_channel) {
        g = grids.at(cursor.channel);
        loaded_channel = cursor.channel;
      }
      out[k] = g.valid ? op(xv[k], dv[k], g.grid) : CUDART_NAN_F;
      cursor.advance(inner, channels);
    }
    store_from_float(y + i, count, vector, out);
  }
}

template <typename Op>
void map_channels(const char* name, const FakeQuantArgs& a, const at::Tensor* grad_output,
                  at::Tensor& result) {
  const c10::cuda::CUDAGuard guard(a.input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t numel = a.input.numel();
  TORCHQUANT_DISPATCH_FLOAT_TYPES(a.input.scalar_type(), name, [&] {
    const int64_t packs = ceil_div(numel, kPackSize<scalar_t>);
    const unsigned int blocks = grid_stride_blocks(packs, kBlockThreads, kBlockThreads);
    with_index_type(numel, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      map_channels_kernel<scalar_t, index_t, Op><<<blocks, kBlockThreads, 0, stream>>>(
          a.input.const_data_ptr<scalar_t>(),
          grad_output ? grad_output->const_data_ptr<scalar_t>() : nullptr,
          result.mutable_data_ptr<scalar_t>(), static_cast<index_t>(numel),
          static_cast<index_t>(a.layout.inner), static_cast<index_t>(a.layout.channels),
          channel_grids(a), Op{});
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

void forward(const FakeQuantArgs& args, at::Tensor& out) {
  map_channels<ForwardOp>("torchquant_fake_quantize_cuda", args, nullptr, out);
}

void ste_backward(const FakeQuantArgs& args, const at::Tensor& grad_output,
                  at::Tensor& grad_input) {
  map_channels<SteBackwardOp>("torchquant_fake_quantize_backward_cuda", args, &grad_output,
                              grad_input);
}

}  // namespace torchquant::cuda
