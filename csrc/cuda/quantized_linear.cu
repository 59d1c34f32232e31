// The CUDA kernels of quantized_linear and quantized_linear_grad_input (the
// QuantLinearKernels contract of csrc/runtime/linear_ops.h).
//
// Small M (at most kGemvMaxRows activation rows) runs the GEMV kernel of
// quantized_gemv.cu, which reads every packed byte once. Larger M is compute
// bound: the weight is dequantized one panel of rows at a time into a float32
// buffer of at most kPanelBytes (small enough to stay in the GPU's L2 between
// the dequantization and the multiplication), and cuBLAS multiplies the panel
// (at::mm). The whole float weight never exists. The input gradient dy W is
// computed the same way, accumulating over the panels. The math stays float32,
// as the op's contract says: the GEMMs are float32 GEMMs (TF32 only where the
// user allowed it for every float32 matmul).
#include "gemv_common.cuh"
#include "runtime_cuda.h"

#include "../runtime/chunk_decode.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>

namespace torchquant::cuda {
namespace {

// Bytes of one float32 panel of dequantized rows: a fraction of an A100 /
// H100 L2 (40 / 50 MiB), and wide enough (1024 rows at K = 4096) for an
// efficient GEMM.
constexpr int64_t kPanelBytes = int64_t{16} << 20;

struct DequantArgs {
  const uint8_t* packed;  // [n, row_bytes]
  const float* scales;    // [n, groups]
  const float* zeros;     // [n, groups]
  const float* lut;       // [16], or nullptr
  float* out;             // [rows, kp]
  int64_t row0;           // first row of W
  int64_t row_bytes;
  int items;              // rows * chunks * 4: one thread per (row, chunk, word)
  int kp;
  int chunks;
  int k;
  int groups;
  int group_size;
};

// out[r, col] = (v(u) - z) * s for W's row row0 + r, exactly as
// dequantize_weight computes it (one float32 subtraction, one product).
// Thread (r, c, t) decodes the column quads of word t of chunk c
// (chunk_decode.h) and stores each quad as one float4.
template <int kBits, bool kLut>
__global__ void __launch_bounds__(256) dequant_rows_kernel(const DequantArgs a) {
  constexpr int kBlocks = layout::kChunkBlocks<kBits>;
  constexpr int kCodes = static_cast<int>(layout::chunk_codes(kBits));
  constexpr int kBytes = static_cast<int>(layout::chunk_bytes(kBits));
  // One group per quad whenever the group size is a multiple of 4: one
  // division per quad instead of one per code.
  const bool quad_groups = (a.group_size & 3) == 0;
  // 32-bit indices (dequantize_rows keeps items below 2^30): a 64-bit
  // division is several times slower.
  const int stride = static_cast<int>(gridDim.x * blockDim.x);
  for (int item = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); item < a.items;
       item += stride) {
    const int t = item & 3;
    const int rc = item >> 2;
    const int r = rc / a.chunks;
    const int c = rc - r * a.chunks;
    const int64_t n = a.row0 + r;
    const uint8_t* p = a.packed + n * a.row_bytes + static_cast<int64_t>(c) * kBytes + 4 * t;
    uint32_t words[kBlocks];
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) words[b] = load_stream_u32(p + 16 * b);
    const float* s_row = a.scales + n * a.groups;
    const float* z_row = a.zeros + n * a.groups;
    float* out_row = a.out + static_cast<int64_t>(r) * a.kp;
#pragma unroll
    for (int i = 0; i < layout::kChunkSlices<kBits>; ++i) {
      const int col = c * kCodes + 16 * i + 4 * t;
      const uint32_t quad = layout::quad_codes<kBits>(words, i);
      const int quad_group = quad_groups && col < a.k ? col / a.group_size : 0;
      float v[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int k = col + q;
        if (k < a.k) {
          const int g = quad_groups ? quad_group : k / a.group_size;
          const float code =
              kLut ? __ldg(a.lut + layout::quad_code(quad, q)) : layout::quad_code_float(quad, q);
          v[q] = (code - __ldg(z_row + g)) * __ldg(s_row + g);
        } else {
          v[q] = 0.0f;  // padding columns: the padded activations are zero too
        }
      }
      // kp is a multiple of 16 and out is 16-byte aligned: a whole, aligned float4.
      *reinterpret_cast<float4*>(out_row + col) = make_float4(v[0], v[1], v[2], v[3]);
    }
  }
}

template <int kBits, bool kLut>
void launch_dequant(const DequantArgs& a, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const unsigned int blocks = grid_stride_blocks(a.items, kThreads, kThreads);
  dequant_rows_kernel<kBits, kLut><<<blocks, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Rows per panel: kPanelBytes of float32 rows of kp columns, at least one.
int64_t panel_rows(int64_t n, int64_t kp) {
  return std::clamp<int64_t>(kPanelBytes / (kp * static_cast<int64_t>(sizeof(float))), 1, n);
}

// The cuBLAS calls below must stay float32: under torch.autocast an ATen
// matmul called from inside this kernel would otherwise be recast to a
// 16-bit type (the autocast keys are still in the thread's dispatch set here).
using NoAutocast = c10::impl::ExcludeDispatchKeyGuard;

}  // namespace

void dequantize_rows(const PackedWeight& w, int64_t row0, int64_t rows, at::Tensor& out) {
  TORCH_INTERNAL_ASSERT(out.scalar_type() == at::kFloat && out.is_contiguous() &&
                        out.size(0) == rows && out.size(1) == w.padded_in_features() &&
                        data_aligned16(out) && row0 >= 0 && row0 + rows <= w.out_features);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Reads are 4-byte words: a packed tensor that starts off a word boundary
  // (a view at an odd offset) is copied once.
  const at::Tensor packed = data_aligned16(w.packed) ? w.packed : w.packed.clone();
  DequantArgs a{};
  a.packed = packed.const_data_ptr<uint8_t>();
  a.scales = w.scales.const_data_ptr<float>();
  a.zeros = w.zeros.const_data_ptr<float>();
  a.lut = w.lut.defined() ? w.lut.const_data_ptr<float>() : nullptr;
  a.out = out.mutable_data_ptr<float>();
  a.row0 = row0;
  a.chunks = static_cast<int>(layout::num_chunks(w.in_features, w.bits));
  // Half the int range, so that the grid-stride index cannot overflow either.
  TORCH_CHECK(rows * a.chunks * 4 <= std::numeric_limits<int>::max() / 2,
              "torchquant: dequantize at most 2^28 chunks at a time, got ", rows, " rows of ",
              a.chunks);
  a.items = static_cast<int>(rows * a.chunks * 4);
  a.row_bytes = w.row_bytes();
  a.kp = static_cast<int>(out.size(1));
  a.k = static_cast<int>(w.in_features);
  a.groups = static_cast<int>(w.groups);
  a.group_size = static_cast<int>(w.group_size);
  switch (w.bits) {
    case 2: launch_dequant<2, false>(a, stream); break;
    case 3: launch_dequant<3, false>(a, stream); break;
    case 4:
      if (a.lut != nullptr) launch_dequant<4, true>(a, stream);
      else launch_dequant<4, false>(a, stream);
      break;
    case 8: launch_dequant<8, false>(a, stream); break;
    default: TORCH_INTERNAL_ASSERT(false, "unsupported bits ", w.bits);
  }
}

void quantized_linear_kernel(const PackedWeight& w, const at::Tensor& x, const at::Tensor& bias,
                             at::Tensor& y) {
  const int64_t m = x.size(0), kp = x.size(1), n = w.out_features;
  // The GEMV kernel folds scales per 16 columns at the finest: a group size
  // that is not a multiple of 16 (none in real models) takes the panel path,
  // which handles any group size. It reads x and the packed rows with vector
  // loads, so a view at an odd offset is copied first (a rare, cheap case).
  if (m <= kGemvMaxRows && w.group_size % 16 == 0) {
    const at::Tensor xa = data_aligned16(x) ? x : x.clone();
    const PackedWeight* wa = &w;
    PackedWeight copy;
    if (!data_aligned16(w.packed)) {
      copy = w;
      copy.packed = w.packed.clone();
      wa = &copy;
    }
    quantized_gemv(*wa, xa, bias, y);
    return;
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  const int64_t rows = panel_rows(n, kp);
  at::Tensor panel = at::empty({rows, kp}, x.options());
  for (int64_t n0 = 0; n0 < n; n0 += rows) {
    const int64_t p = std::min(rows, n - n0);
    at::Tensor wp = panel.narrow(0, 0, p);
    dequantize_rows(w, n0, p, wp);
    // y[:, n0 : n0 + p] = x Wp^T; cuBLAS writes the strided column block in place.
    at::Tensor yp = y.narrow(1, n0, p);
    at::mm_out(yp, x, wp.t());
  }
  if (bias.defined()) y.add_(bias);
}

void quantized_linear_grad_input_kernel(const PackedWeight& w, const at::Tensor& dy,
                                        at::Tensor& dx) {
  const int64_t kp = dx.size(1), n = w.out_features;
  const c10::cuda::CUDAGuard guard(dy.device());
  const NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  const int64_t rows = panel_rows(n, kp);
  at::Tensor panel = at::empty({rows, kp}, dy.options());
  // dx = sum over panels of dy[:, n0 : n0 + p] Wp (Wp [p, kp]).
  for (int64_t n0 = 0; n0 < n; n0 += rows) {
    const int64_t p = std::min(rows, n - n0);
    at::Tensor wp = panel.narrow(0, 0, p);
    dequantize_rows(w, n0, p, wp);
    const at::Tensor dyp = dy.narrow(1, n0, p);
    if (n0 == 0) {
      at::mm_out(dx, dyp, wp);
    } else {
      dx.addmm_(dyp, wp);
    }
  }
}

at::Tensor dequantize_weight(const at::Tensor& packed, const at::Tensor& scales,
                             const at::Tensor& zeros, int64_t bits, int64_t in_features,
                             const std::optional<at::Tensor>& lut) {
  const PackedWeight w = check_packed_weight("torchquant.dequantize_weight", packed, scales, zeros,
                                             bits, in_features, lut, packed.device());
  const int64_t n = w.out_features, kp = w.padded_in_features();
  at::Tensor out = at::empty({n, kp}, w.scales.options());
  // Row blocks whose thread count fits dequantize_rows' 32-bit indices.
  const int64_t rows =
      std::max<int64_t>(1, std::numeric_limits<int>::max() / 2 / (kp / 4 + 4));
  for (int64_t n0 = 0; n0 < n; n0 += rows) {
    at::Tensor part = out.narrow(0, n0, std::min(rows, n - n0));
    dequantize_rows(w, n0, part.size(0), part);
  }
  return kp == in_features ? out : out.narrow(1, 0, in_features).contiguous();
}

}  // namespace torchquant::cuda
