// w8a8_linear on CUDA: int8 activations times the int8 weight, exact int32
// accumulation, then y = acc * s_x * s_w + bias in float32, in x's dtype.
//
// The weight arrives in the 8-bit packed layout, u = q + 128 per byte, [N, Kp]
// with Kp = K rounded up to 16 (zero bytes, i.e. q = -128, past K; the
// activation codes are zero there, so the padding adds nothing). Per byte,
// q = u ^ 0x80 reinterpreted as int8, so a kernel gets the signed weight for
// one XOR per four codes and needs no zero-point compensation.
//
// Two paths, by the number of activation rows M:
//  * M <= kGemvMaxM: memory bound. A GEMV kernel with __dp4a (four int8
//    products per instruction) reads every weight byte once; each thread owns
//    16-byte chunks of kRows weight rows and the matching 16 activation codes
//    of each of up to kMaxM rows (both loads fully coalesced), and the block
//    adds its threads' int32 partial sums (exact, so the order is immaterial).
//  * M > kGemvMaxM (torch._int_mm needs M > 16): compute bound, so the tensor
//    cores pay off. cuBLASLt takes int8 operands only, so each panel of
//    weight rows is converted (u ^ 0x80) into a buffer of at most kPanelBytes
//    that stays in L2, multiplied by at::_int_mm, and an epilogue kernel
//    applies the scales and the bias. The conversion re-reads the weight once
//    and writes it once: small next to a GEMM at this M, and no whole-weight
//    copy is made.
// Activation quantization reuses quantize_per_token (dynamic grids) or the
// static grid's clamp(round(x * (1 / s))) in ATen, the same code as the CPU.
// LLM.int8() (outlier_threshold > 0) quantizes the rows with its own kernel
// (grids over the non-outlier values, outlier columns flagged) and adds the
// outlier columns' float product at the end (add_outlier_product, shared).
#include "gemv_common.cuh"
#include "runtime_cuda.h"

#include "../dispatch.h"
#include "../ptq/smoothquant.h"
#include "../quant_math.h"
#include "../runtime/linear_args.h"

#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

namespace torchquant::cuda {
namespace {

constexpr const char* kOp = "torchquant.w8a8_linear";
// Weight rows per GEMV block, and activation rows per GEMV launch at most.
constexpr int kRows = 4;
constexpr int kMaxM = 8;
// Above this many activation rows, torch._int_mm (which needs more than 16).
constexpr int64_t kGemvMaxM = 16;
// Bytes of one converted int8 weight panel.
constexpr int64_t kPanelBytes = int64_t{16} << 20;
constexpr uint32_t kSignFlip = 0x80808080u;  // u ^ 0x80 = q, per byte

template <typename scalar_t>
struct GemvArgs {
  const uint8_t* packed;  // [n, kp], 16-byte aligned
  const int8_t* codes;    // [m, kp], 16-byte aligned, zero past K
  const float* x_scale;   // scale of row m: x_scale[m * x_scale_stride]
  const float* w_scale;   // [n]
  const float* bias;      // [n], or nullptr
  scalar_t* y;            // [m, n]
  int x_scale_stride;     // 1: per token; 0: one static scale
  int m;                  // rows of this launch, 1..kMaxM
  int n;
  int kp;
  int chunks;             // kp / 16
};

// y = acc * s_x * s_w (+ bias), in this order, in float32.
__device__ __forceinline__ float w8a8_output(int acc, float sx, float sw, const float* bias,
                                             int64_t n) {
  const float v = static_cast<float>(acc) * sx * sw;
  return bias != nullptr ? v + bias[n] : v;
}

template <typename scalar_t, int kM>
__global__ void __launch_bounds__(kGemvThreads) w8a8_gemv_kernel(const GemvArgs<scalar_t> a) {
  __shared__ int partial[kGemvThreads / 32][kM * kRows];
  int rows[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int n = static_cast<int>(blockIdx.x) * kRows + r;
    rows[r] = n < a.n ? n : a.n - 1;  // past the last row: read it again, drop the result
  }
  int acc[kM][kRows] = {};
  uint4 w[kRows] = {};
  int c = static_cast<int>(threadIdx.x);
  const int step = static_cast<int>(blockDim.x);
  if (c < a.chunks) {
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      w[r] = load_stream_u128(a.packed + static_cast<int64_t>(rows[r]) * a.kp + 16 * c);
  }
  for (; c < a.chunks; c += step) {
    // The next chunk's loads are issued before this one is used.
    uint4 next[kRows] = {};
    if (c + step < a.chunks) {
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        next[r] = load_stream_u128(a.packed + static_cast<int64_t>(rows[r]) * a.kp +
                                   16 * (c + step));
    }
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      const int xm = m < a.m ? m : a.m - 1;
      const uint4 xv =
          __ldg(reinterpret_cast<const uint4*>(a.codes + static_cast<int64_t>(xm) * a.kp) + c);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        int s = acc[m][r];
        s = __dp4a(static_cast<int>(w[r].x ^ kSignFlip), static_cast<int>(xv.x), s);
        s = __dp4a(static_cast<int>(w[r].y ^ kSignFlip), static_cast<int>(xv.y), s);
        s = __dp4a(static_cast<int>(w[r].z ^ kSignFlip), static_cast<int>(xv.z), s);
        acc[m][r] = __dp4a(static_cast<int>(w[r].w ^ kSignFlip), static_cast<int>(xv.w), s);
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) w[r] = next[r];
  }

  int flat[kM * kRows];
#pragma unroll
  for (int m = 0; m < kM; ++m) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) flat[m * kRows + r] = acc[m][r];
  }
  const int total = block_sum(flat, partial);
  if (static_cast<int>(threadIdx.x) < kM * kRows) {
    const int m = static_cast<int>(threadIdx.x) / kRows;
    const int n = static_cast<int>(blockIdx.x) * kRows + static_cast<int>(threadIdx.x) % kRows;
    if (m < a.m && n < a.n) {
      const float v =
          w8a8_output(total, a.x_scale[m * a.x_scale_stride], a.w_scale[n], a.bias, n);
      a.y[static_cast<int64_t>(m) * a.n + n] = static_cast<scalar_t>(v);
    }
  }
}

template <typename scalar_t, int kM>
void launch_gemv(const GemvArgs<scalar_t>& a, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned int>(ceil_div(a.n, kRows));
  const int threads = gemv_threads(a.chunks, 1);
  w8a8_gemv_kernel<scalar_t, kM><<<blocks, threads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out [pp, kp] int8 = q of rows [0, p) of `packed` (already offset to the
// panel's first row), zero rows from p to pp (torch._int_mm needs a multiple
// of 8 columns). 16 bytes per thread and step.
__global__ void __launch_bounds__(256)
    weight_to_int8_kernel(const uint4* __restrict__ packed, uint4* __restrict__ out,
                          int64_t valid, int64_t total) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (i < valid) {
      v = load_stream_u128(packed + i);
      v = make_uint4(v.x ^ kSignFlip, v.y ^ kSignFlip, v.z ^ kSignFlip, v.w ^ kSignFlip);
    }
    out[i] = v;
  }
}

// y[m, j] = acc[m, j] * s_x[m] * s_w[j] (+ bias[j]) for j < p; y, s_w and bias
// already offset to the panel's first column, y's rows n apart.
template <typename scalar_t>
__global__ void __launch_bounds__(256)
    epilogue_kernel(const int* __restrict__ acc, int pp, int p, int m, const float* x_scale,
                    int x_scale_stride, const float* w_scale, const float* bias, scalar_t* y,
                    int64_t n) {
  for (int row = static_cast<int>(blockIdx.y); row < m; row += static_cast<int>(gridDim.y)) {
    const float sx = x_scale[static_cast<int64_t>(row) * x_scale_stride];
    for (int j = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); j < p;
         j += static_cast<int>(gridDim.x * blockDim.x)) {
      const float v = w8a8_output(acc[static_cast<int64_t>(row) * pp + j], sx, w_scale[j], bias, j);
      y[static_cast<int64_t>(row) * n + j] = static_cast<scalar_t>(v);
    }
  }
}

// LLM.int8()'s one pass over each token row (one block per row): the grid
// from max |x| over the values below the threshold, the codes of the whole
// row (zero past K), and a flag for the column of every larger value. A row
// holding NaN gets a NaN scale, so its outputs are NaN, not numbers.
template <typename scalar_t>
__global__ void __launch_bounds__(256)
    outlier_quantize_kernel(const scalar_t* __restrict__ x, int64_t m, int64_t k, int64_t kp,
                            float threshold, int8_t* __restrict__ codes,
                            float* __restrict__ scales, uint8_t* __restrict__ flags) {
  __shared__ float partial[256];
  __shared__ int any_nan;
  for (int64_t row = blockIdx.x; row < m; row += gridDim.x) {
    const scalar_t* xr = x + row * k;
    if (threadIdx.x == 0) any_nan = 0;
    __syncthreads();  // the reset lands before any thread of this row can set it
    float a = 0.0f;
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      const float v = fabsf(static_cast<float>(xr[j]));
      if (v >= threshold) {
        flags[j] = 1;  // every writer stores the same value
      } else if (v > a) {
        a = v;
      } else if (isnan(v)) {
        any_nan = 1;
      }
    }
    partial[threadIdx.x] = a;
    __syncthreads();
    for (int s = static_cast<int>(blockDim.x) / 2; s > 0; s /= 2) {
      if (static_cast<int>(threadIdx.x) < s)
        partial[threadIdx.x] = fmaxf(partial[threadIdx.x], partial[threadIdx.x + s]);
      __syncthreads();
    }
    float scale, zero;
    grid_from_range(-partial[0], partial[0], -128.0f, 127.0f, /*symmetric=*/true,
                    ptq::kMinTokenScale, &scale, &zero);
    const QuantGrid<float> g{scale, 1.0f / scale, zero, -128.0f, 127.0f};
    for (int64_t j = threadIdx.x; j < kp; j += blockDim.x) {
      float q = 0.0f;
      if (j < k) q = qm_min(qm_max(unclamped_code(static_cast<float>(xr[j]), g), g.qmin), g.qmax);
      codes[row * kp + j] = static_cast<int8_t>(q);
    }
    if (threadIdx.x == 0) scales[row] = any_nan ? __int_as_float(0x7fc00000) : scale;
    __syncthreads();  // partial and any_nan are reused by the next row
  }
}

// The outlier columns leave the int8 product: their codes become 0.
__global__ void __launch_bounds__(256)
    zero_outlier_columns_kernel(int8_t* __restrict__ codes, const uint8_t* __restrict__ flags,
                                int64_t m, int64_t k, int64_t kp) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < m * k;
       i += stride) {
    const int64_t j = i % k;
    if (flags[j]) codes[(i / k) * kp + j] = 0;
  }
}

// Activation codes int8 [m, kp] (zero past K, 16-byte aligned) and their
// scales: per token (float32 [m, 1], stride 1) or the static one (stride 0).
// With an outlier threshold, also flags the outlier columns (uint8 [K]).
std::tuple<at::Tensor, at::Tensor, int> quantize_activations(const at::Tensor& x2,
                                                             const W8A8Args& a, int64_t kp,
                                                             const at::Tensor& flags) {
  at::Tensor codes, scale;
  int stride = 1;
  if (a.outlier_threshold > 0.0f) {
    const int64_t m = x2.size(0), k = x2.size(1);
    const at::Tensor x = x2.contiguous();
    codes = at::empty({m, kp}, x.options().dtype(at::kChar));
    scale = at::empty({m, 1}, x.options().dtype(at::kFloat));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    TORCHQUANT_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] {
      outlier_quantize_kernel<scalar_t><<<static_cast<unsigned int>(std::min<int64_t>(m, 65535)),
                                          256, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), m, k, kp, a.outlier_threshold,
          codes.mutable_data_ptr<int8_t>(), scale.mutable_data_ptr<float>(),
          flags.mutable_data_ptr<uint8_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    zero_outlier_columns_kernel<<<grid_stride_blocks(m * k, 256, 256), 256, 0, stream>>>(
        codes.mutable_data_ptr<int8_t>(), flags.const_data_ptr<uint8_t>(), m, k, kp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {codes, scale, stride};
  }
  if (a.input_scale.defined()) {
    // x * (1 / s) in float32 (x is promoted), rounded half to even, clamped.
    codes = at::mul(x2, at::reciprocal(a.input_scale)).round_().clamp_(-128, 127).to(at::kChar);
    scale = a.input_scale;
    stride = 0;
  } else {
    std::tie(codes, scale) = ptq::quantize_per_token(x2, -128, 127);
  }
  if (codes.size(1) != kp || !codes.is_contiguous() || !data_aligned16(codes)) {
    at::Tensor padded = at::zeros({codes.size(0), kp}, codes.options());
    padded.narrow(1, 0, codes.size(1)).copy_(codes);
    codes = padded;
  }
  return {codes, scale.contiguous(), stride};
}

}  // namespace

at::Tensor w8a8_linear(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& scales,
                       const std::optional<at::Tensor>& input_scale,
                       const std::optional<at::Tensor>& bias, double outlier_threshold) {
  const W8A8Args a =
      check_w8a8_args(kOp, input, packed, scales, input_scale, bias, outlier_threshold);
  const int64_t k = a.in_features, n = a.out_features, kp = layout::packed_row_bytes(k, 8);
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = n;
  const at::Tensor x2 = input.reshape({-1, k});
  const int64_t m = x2.size(0);
  at::Tensor y = at::empty({m, n}, input.options());
  if (m == 0 || n == 0) return y.view(out_shape);
  TORCH_CHECK(n <= std::numeric_limits<int>::max() && kp <= std::numeric_limits<int>::max() &&
                  m <= std::numeric_limits<int>::max(),
              kOp, ": the CUDA kernels need fewer than 2^31 rows, output and input features");

  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Plain variables, not a structured binding: the lambda below captures them
  // (which C++17, used by the setuptools build, does not allow for bindings).
  at::Tensor codes, x_scale;
  int x_scale_stride = 1;
  const at::Tensor outlier_columns =
      a.outlier_threshold > 0.0f ? at::zeros({k}, input.options().dtype(at::kByte)) : at::Tensor();
  std::tie(codes, x_scale, x_scale_stride) = quantize_activations(x2, a, kp, outlier_columns);
  // 16-byte loads: a weight view at an odd offset is copied once.
  const at::Tensor w = data_aligned16(a.packed) ? a.packed : a.packed.clone();
  const float* w_scale = a.scales.const_data_ptr<float>();
  const float* bias_ptr = a.bias.defined() ? a.bias.const_data_ptr<float>() : nullptr;

  TORCHQUANT_DISPATCH_FLOAT_TYPES(input.scalar_type(), kOp, [&] {
    if (m <= kGemvMaxM) {
      for (int64_t m0 = 0; m0 < m; m0 += kMaxM) {
        GemvArgs<scalar_t> g{};
        g.packed = w.const_data_ptr<uint8_t>();
        g.codes = codes.const_data_ptr<int8_t>() + m0 * kp;
        g.x_scale = x_scale.const_data_ptr<float>() + m0 * x_scale_stride;
        g.x_scale_stride = x_scale_stride;
        g.w_scale = w_scale;
        g.bias = bias_ptr;
        g.y = y.mutable_data_ptr<scalar_t>() + m0 * n;
        g.m = static_cast<int>(std::min<int64_t>(kMaxM, m - m0));
        g.n = static_cast<int>(n);
        g.kp = static_cast<int>(kp);
        g.chunks = static_cast<int>(kp / 16);
        if (g.m <= 1) launch_gemv<scalar_t, 1>(g, stream);
        else if (g.m <= 2) launch_gemv<scalar_t, 2>(g, stream);
        else if (g.m <= 4) launch_gemv<scalar_t, 4>(g, stream);
        else launch_gemv<scalar_t, kMaxM>(g, stream);
      }
      return;
    }
    // Panels of rows (a multiple of 8) of the int8 weight.
    const int64_t n8 = ceil_div(n, 8) * 8;
    const int64_t rows = std::clamp<int64_t>(kPanelBytes / kp / 8 * 8, 8, n8);
    at::Tensor wq = at::empty({rows, kp}, codes.options());
    at::Tensor acc_buf = at::empty({m * rows}, codes.options().dtype(at::kInt));
    for (int64_t n0 = 0; n0 < n; n0 += rows) {
      const int64_t p = std::min(rows, n - n0), pp = ceil_div(p, 8) * 8;
      at::Tensor wq_p = wq.narrow(0, 0, pp);
      const int64_t valid = p * kp / 16, total = pp * kp / 16;
      weight_to_int8_kernel<<<grid_stride_blocks(total, 256, 256), 256, 0, stream>>>(
          reinterpret_cast<const uint4*>(w.const_data_ptr<uint8_t>() + n0 * kp),
          reinterpret_cast<uint4*>(wq_p.mutable_data_ptr<int8_t>()), valid, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // [m, kp] x [kp, pp]: the row-major codes times the column-major weight
      // panel, the operand layout cuBLASLt's int8 GEMM wants.
      at::Tensor acc = acc_buf.narrow(0, 0, m * pp).view({m, pp});
      at::_int_mm_out(acc, codes, wq_p.t());
      const dim3 grid(static_cast<unsigned int>(ceil_div(p, 256)),
                      static_cast<unsigned int>(std::min<int64_t>(m, 65535)));
      epilogue_kernel<scalar_t><<<grid, 256, 0, stream>>>(
          acc.const_data_ptr<int>(), static_cast<int>(pp), static_cast<int>(p),
          static_cast<int>(m), x_scale.const_data_ptr<float>(), x_scale_stride, w_scale + n0,
          bias_ptr != nullptr ? bias_ptr + n0 : nullptr, y.mutable_data_ptr<scalar_t>() + n0, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (outlier_columns.defined()) add_outlier_product(a, x2.contiguous(), outlier_columns, y);
  return y.view(out_shape);
}

}  // namespace torchquant::cuda
