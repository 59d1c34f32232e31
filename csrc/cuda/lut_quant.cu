// lut_quantize / lut_dequantize on CUDA: one thread block per block of values
// (absmax by a shared-memory reduction, then the codes), and one thread per
// value for the inverse. The per-value math and the argument checks are
// csrc/runtime/lut_quant.h's, the CPU kernels' too.
#include "kernel_utils.cuh"
#include "runtime_cuda.h"

#include "../runtime/lut_quant.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

namespace torchquant::cuda {
namespace {

constexpr int kThreads = 128;

__global__ void __launch_bounds__(kThreads)
    lut_quantize_kernel(const float* __restrict__ x, int64_t n, int64_t block_size, int64_t blocks,
                        const lut::SortedLevels t, uint8_t* __restrict__ codes,
                        float* __restrict__ absmax) {
  __shared__ float partial[kThreads];
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const int64_t k0 = b * block_size, k1 = min_i64(n, k0 + block_size);
    float a = 0.0f;
    for (int64_t k = k0 + threadIdx.x; k < k1; k += kThreads) a = fmaxf(a, fabsf(x[k]));
    partial[threadIdx.x] = a;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s /= 2) {
      if (static_cast<int>(threadIdx.x) < s)
        partial[threadIdx.x] = fmaxf(partial[threadIdx.x], partial[threadIdx.x + s]);
      __syncthreads();
    }
    const float amax = partial[0];
    if (threadIdx.x == 0) absmax[b] = amax;
    const float inv = lut::inverse_absmax(amax);
    for (int64_t k = k0 + threadIdx.x; k < k1; k += kThreads) codes[k] = lut::quantize_value(x[k], inv, t);
    __syncthreads();  // partial is reused by the next block of values
  }
}

// Codes past the table read NaN (the table is padded with NaN to 256 levels):
// on the GPU the codes are not checked on the host, and a wrong one must not
// pass for a value.
__global__ void __launch_bounds__(256)
    lut_dequantize_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ absmax,
                          const float* __restrict__ lut, int levels, int64_t n, int64_t block_size,
                          float* __restrict__ out) {
  __shared__ float table[lut::kMaxLevels];
  for (int i = threadIdx.x; i < lut::kMaxLevels; i += blockDim.x)
    table[i] = i < levels ? lut[i] : __int_as_float(0x7fc00000);
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = table[codes[i]] * absmax[i / block_size];
}

constexpr const char* kQuantizeOp = "torchquant.lut_quantize";
constexpr const char* kDequantizeOp = "torchquant.lut_dequantize";

}  // namespace

std::tuple<at::Tensor, at::Tensor> lut_quantize(const at::Tensor& x, const at::Tensor& lut,
                                                int64_t block_size) {
  const lut::SortedLevels t = lut::check_quantize_args(kQuantizeOp, x, lut, block_size);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xf = x.contiguous().to(at::kFloat);
  const int64_t n = xf.numel(), blocks = lut::num_blocks(n, block_size);
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, x.options().dtype(at::kFloat));
  if (blocks == 0) return {codes, absmax};
  const auto grid = static_cast<unsigned int>(min_i64(blocks, 65535));
  lut_quantize_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      xf.const_data_ptr<float>(), n, block_size, blocks, t, codes.mutable_data_ptr<uint8_t>(),
      absmax.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, absmax};
}

at::Tensor lut_dequantize(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& lut,
                          int64_t block_size) {
  lut::check_dequantize_args(kDequantizeOp, codes, absmax, lut, block_size, /*check_values=*/false);
  const c10::cuda::CUDAGuard guard(codes.device());
  const at::Tensor c = codes.contiguous();
  const at::Tensor a = absmax.contiguous();
  const at::Tensor l = lut.contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const int64_t n = c.numel();
  if (n == 0) return out;
  lut_dequantize_kernel<<<grid_stride_blocks(n, 256, 256), 256, 0,
                          c10::cuda::getCurrentCUDAStream()>>>(
      c.const_data_ptr<uint8_t>(), a.const_data_ptr<float>(), l.const_data_ptr<float>(),
      static_cast<int>(l.numel()), n, block_size, out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace torchquant::cuda
