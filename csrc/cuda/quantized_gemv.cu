// Host side of the GEMV path of quantized_linear (the kernels are in
// quantized_gemv.cuh, instantiated by quantized_gemv_bits{2,3,4,8}.cu).
#include "quantized_gemv.cuh"
#include "runtime_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>

namespace torchquant::cuda {
namespace gemv {
extern template void launch_bits<2>(const GemvArgs&, bool, bool, int, cudaStream_t);
extern template void launch_bits<3>(const GemvArgs&, bool, bool, int, cudaStream_t);
extern template void launch_bits<4>(const GemvArgs&, bool, bool, int, cudaStream_t);
extern template void launch_bits<8>(const GemvArgs&, bool, bool, int, cudaStream_t);
}  // namespace gemv

using gemv::GemvArgs;
using gemv::kMaxM;
using gemv::kThreadsPerChunk;
using gemv::launch_bits;

void quantized_gemv(const PackedWeight& w, const at::Tensor& x, const at::Tensor& bias,
                    at::Tensor& y) {
  const int64_t m_total = x.size(0), kp = x.size(1), n = w.out_features;
  TORCH_INTERNAL_ASSERT(m_total >= 1 && m_total <= kGemvMaxRows && w.group_size % 16 == 0 &&
                        kp == w.padded_in_features() && data_aligned16(x) &&
                        data_aligned16(w.packed) && x.is_contiguous() && y.is_contiguous());
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(n <= kIntMax && kp <= kIntMax / kMaxM && w.row_bytes() <= kIntMax,
              "torchquant.quantized_linear: the CUDA kernel needs a weight with fewer than 2^31 "
              "rows and bytes per row");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const int64_t codes = layout::chunk_codes(w.bits);
  const bool slice_fold = w.group_size % codes != 0;
  GemvArgs a{};
  a.packed = w.packed.const_data_ptr<uint8_t>();
  a.scales = w.scales.const_data_ptr<float>();
  a.zeros = w.zeros.const_data_ptr<float>();
  a.lut = w.lut.defined() ? w.lut.const_data_ptr<float>() : nullptr;
  a.bias = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  a.n = static_cast<int>(n);
  a.kp = static_cast<int>(kp);
  a.chunks = static_cast<int>(layout::num_chunks(w.in_features, w.bits));
  a.row_bytes = static_cast<int>(w.row_bytes());
  a.groups = static_cast<int>(w.groups);
  a.units_per_group = static_cast<int>(slice_fold ? w.group_size / 16 : w.group_size / codes);
  const int threads = gemv_threads(static_cast<int64_t>(a.chunks) * kThreadsPerChunk, 1);

  // More than kMaxM rows: one launch per kMaxM rows (each reads W again; the
  // panel path of quantized_linear.cu takes over above kGemvMaxRows).
  for (int64_t m0 = 0; m0 < m_total; m0 += kMaxM) {
    a.x = x.const_data_ptr<float>() + m0 * kp;
    a.y = y.mutable_data_ptr<float>() + m0 * n;
    a.m = static_cast<int>(std::min<int64_t>(kMaxM, m_total - m0));
    switch (w.bits) {
      case 2: launch_bits<2>(a, false, slice_fold, threads, stream); break;
      case 3: launch_bits<3>(a, false, slice_fold, threads, stream); break;
      case 4: launch_bits<4>(a, a.lut != nullptr, slice_fold, threads, stream); break;
      case 8: launch_bits<8>(a, false, slice_fold, threads, stream); break;
      default: TORCH_INTERNAL_ASSERT(false, "unsupported bits ", w.bits);
    }
  }
}

}  // namespace torchquant::cuda
