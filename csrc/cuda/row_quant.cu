// quantize_rows on CUDA: one warp per row (min / max by shuffles, then the
// codes), the per-row math being csrc/runtime/row_quant.h's, then the codes
// packed by the shared ATen packer. Values are not checked on the host (that
// would synchronise): a NaN row gets a NaN scale, so it dequantizes to NaN.
#include "kernel_utils.cuh"
#include "runtime_cuda.h"

#include "../dispatch.h"
#include "../runtime/linear_ops.h"
#include "../runtime/row_quant.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

namespace torchquant::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;

template <typename scalar_t>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock)
    quantize_rows_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t k, int bits,
                         uint8_t* __restrict__ codes, float* __restrict__ scales,
                         float* __restrict__ zeros) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp; r < rows;
       r += warps) {
    const scalar_t* row = x + r * k;
    float lo = static_cast<float>(row[0]), hi = lo;
    bool nan = false;
    for (int64_t j = lane; j < k; j += kWarp) {
      const float v = static_cast<float>(row[j]);
      nan = nan || isnan(v);
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
    for (int off = kWarp / 2; off > 0; off /= 2) {
      lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, off));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, off));
    }
    nan = __any_sync(0xffffffffu, nan);
    const QuantGrid<float> g = rows::row_grid(lo, hi, bits);
    if (lane == 0) {
      scales[r] = nan ? __int_as_float(0x7fc00000) : g.scale;
      zeros[r] = g.zero;
    }
    for (int64_t j = lane; j < k; j += kWarp) codes[r * k + j] = rows::row_code(static_cast<float>(row[j]), g);
  }
}

constexpr const char* kOp = "torchquant.quantize_rows";

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, int64_t bits) {
  rows::check_args(kOp, x, bits);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.size(0), k = xc.size(1);
  at::Tensor codes = at::empty({n, k}, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty({n, 1}, x.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty({n, 1}, x.options().dtype(at::kFloat));
  if (n > 0) {
    const auto blocks = static_cast<unsigned int>(min_i64(ceil_div(n, kRowsPerBlock), 65535));
    TORCHQUANT_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] {
      quantize_rows_kernel<scalar_t><<<blocks, kWarp * kRowsPerBlock, 0,
                                       c10::cuda::getCurrentCUDAStream()>>>(
          xc.const_data_ptr<scalar_t>(), n, k, static_cast<int>(bits),
          codes.mutable_data_ptr<uint8_t>(), scales.mutable_data_ptr<float>(),
          zeros.mutable_data_ptr<float>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {pack_weight_aten(codes, bits, /*check_values=*/false), scales, zeros};
}

}  // namespace torchquant::cuda
