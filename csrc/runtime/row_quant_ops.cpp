// quantize_rows on CPU (and the argument checks every backend shares): one
// task per range of rows; each row's min / max, grid and codes (row_quant.h),
// then the codes packed into the run-time layout by the shared ATen packer.
#include "row_quant.h"

#include "linear_args.h"
#include "linear_ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace torchquant::rows {

void check_args(const char* op, const at::Tensor& x, int64_t bits) {
  TORCH_CHECK_VALUE(bits == 2 || bits == 4 || bits == 8, op, ": bits must be 2, 4 or 8, got ", bits);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                       x.scalar_type() == at::kBFloat16,
                   op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) >= 1, op,
                    ": x must have shape [rows, K] with K >= 1, got ", shape_str(x.sizes()));
}

namespace {

constexpr const char* kOp = "torchquant.quantize_rows";

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows_cpu(const at::Tensor& x,
                                                                 int64_t bits) {
  check_args(kOp, x, bits);
  TORCH_CHECK_VALUE(x.numel() == 0 || at::isfinite(x).all().item<bool>(), kOp,
                    ": x must be finite, got NaN or Inf");
  const at::Tensor xf = x.contiguous().to(at::kFloat);
  const int64_t rows = xf.size(0), k = xf.size(1);
  at::Tensor codes = at::empty({rows, k}, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty({rows, 1}, x.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty({rows, 1}, x.options().dtype(at::kFloat));
  const float* src = xf.const_data_ptr<float>();
  uint8_t* dst = codes.mutable_data_ptr<uint8_t>();
  float* sp = scales.mutable_data_ptr<float>();
  float* zp = zeros.mutable_data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / k), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = src + r * k;
      float lo = row[0], hi = row[0];
      for (int64_t j = 1; j < k; ++j) {
        lo = std::min(lo, row[j]);
        hi = std::max(hi, row[j]);
      }
      const QuantGrid<float> g = row_grid(lo, hi, static_cast<int>(bits));
      sp[r] = g.scale;
      zp[r] = g.zero;
      for (int64_t j = 0; j < k; ++j) dst[r * k + j] = row_code(row[j], g);
    }
  });
  return {pack_weight_aten(codes, bits, /*check_values=*/false), scales, zeros};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchquant, CPU, m) {
  m.impl("quantize_rows", &quantize_rows_cpu);
}

}  // namespace torchquant::rows
