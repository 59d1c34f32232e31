// lut_quantize / lut_dequantize: the argument checks every backend shares, and
// the CPU kernels. Block-wise lookup-table codes are a load-time conversion
// (NF4 / FP4 weights, double quantization of their scales): each block of
// values runs on one thread, the per-value math being lut_quant.h's.
#include "lut_quant.h"

#include "linear_args.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>
#include <vector>

namespace torchquant::lut {

void sort_levels(const float* levels, int n, SortedLevels* t) {
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return levels[a] < levels[b]; });
  t->levels = n;
  for (int i = 0; i < n; ++i) t->code[i] = static_cast<uint8_t>(order[i]);
  // (a + b) / 2 in float32, as torch computes the midpoints of a float32 table.
  for (int i = 0; i + 1 < n; ++i) {
    t->midpoints[i] = (levels[order[i]] + levels[order[i + 1]]) / 2.0f;
  }
}

namespace {

void check_table(const char* op, const at::Tensor& lut, c10::Device device) {
  TORCH_CHECK_TYPE(lut.scalar_type() == at::kFloat, op, ": lut must be float32, got ",
                   lut.scalar_type());
  TORCH_CHECK_VALUE(lut.dim() == 1 && lut.numel() >= 2 && lut.numel() <= kMaxLevels, op,
                    ": lut must have shape [L] with 2 <= L <= ", kMaxLevels, " levels, got ",
                    shape_str(lut.sizes()));
  check_device(op, "lut", lut, device);
}

void check_block_size(const char* op, int64_t block_size) {
  TORCH_CHECK_VALUE(block_size >= 1, op, ": block_size must be positive, got ", block_size);
}

}  // namespace

SortedLevels check_quantize_args(const char* op, const at::Tensor& x, const at::Tensor& lut,
                                 int64_t block_size) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                       x.scalar_type() == at::kBFloat16,
                   op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  check_table(op, lut, x.device());
  check_block_size(op, block_size);
  // One host read each: a conversion runs once per weight, and a NaN or an Inf would
  // silently turn its whole block into garbage codes.
  TORCH_CHECK_VALUE(x.numel() == 0 || at::isfinite(x).all().item<bool>(), op,
                    ": x must be finite, got NaN or Inf");
  const at::Tensor host = lut.to(at::kCPU).contiguous();
  TORCH_CHECK_VALUE(at::isfinite(host).all().item<bool>(), op,
                    ": lut must hold finite levels, got NaN or Inf");
  SortedLevels t{};
  sort_levels(host.const_data_ptr<float>(), static_cast<int>(host.numel()), &t);
  return t;
}

void check_dequantize_args(const char* op, const at::Tensor& codes, const at::Tensor& absmax,
                           const at::Tensor& lut, int64_t block_size, bool check_values) {
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kByte, op, ": codes must be uint8, got ",
                   codes.scalar_type());
  check_block_size(op, block_size);
  check_table(op, lut, codes.device());
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, op, ": absmax must be float32, got ",
                   absmax.scalar_type());
  const int64_t blocks = num_blocks(codes.numel(), block_size);
  TORCH_CHECK_VALUE(absmax.dim() == 1 && absmax.numel() == blocks, op,
                    ": absmax must have shape [", blocks, "] (one value per block of ", block_size,
                    " of the ", codes.numel(), " codes), got ", shape_str(absmax.sizes()));
  check_device(op, "absmax", absmax, codes.device());
  if (check_values && codes.numel() > 0) {
    const int64_t max_code = codes.max().item<int64_t>();
    TORCH_CHECK_VALUE(max_code < lut.numel(), op, ": codes must index the ", lut.numel(),
                      " levels of lut, got a code of ", max_code);
  }
}

namespace {

constexpr const char* kQuantizeOp = "torchquant.lut_quantize";
constexpr const char* kDequantizeOp = "torchquant.lut_dequantize";

std::tuple<at::Tensor, at::Tensor> lut_quantize_cpu(const at::Tensor& x, const at::Tensor& lut,
                                                    int64_t block_size) {
  const SortedLevels t = check_quantize_args(kQuantizeOp, x, lut, block_size);
  const at::Tensor xf = x.contiguous().to(at::kFloat);
  const int64_t n = xf.numel(), blocks = num_blocks(n, block_size);
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, x.options().dtype(at::kFloat));
  const float* src = xf.const_data_ptr<float>();
  uint8_t* dst = codes.mutable_data_ptr<uint8_t>();
  float* amax = absmax.mutable_data_ptr<float>();
  at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / block_size), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t k0 = b * block_size, k1 = std::min(n, k0 + block_size);
      float a = 0.0f;
      for (int64_t k = k0; k < k1; ++k) a = std::max(a, std::abs(src[k]));
      amax[b] = a;
      const float inv = inverse_absmax(a);
      for (int64_t k = k0; k < k1; ++k) dst[k] = quantize_value(src[k], inv, t);
    }
  });
  return {codes, absmax};
}

at::Tensor lut_dequantize_cpu(const at::Tensor& codes, const at::Tensor& absmax,
                              const at::Tensor& lut, int64_t block_size) {
  check_dequantize_args(kDequantizeOp, codes, absmax, lut, block_size, /*check_values=*/true);
  const at::Tensor c = codes.contiguous();
  const at::Tensor a = absmax.contiguous();
  const at::Tensor l = lut.contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const uint8_t* cp = c.const_data_ptr<uint8_t>();
  const float* ap = a.const_data_ptr<float>();
  const float* lp = l.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, c.numel(), 32768, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) op[i] = lp[cp[i]] * ap[i / block_size];
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchquant, CPU, m) {
  m.impl("lut_quantize", &lut_quantize_cpu);
  m.impl("lut_dequantize", &lut_dequantize_cpu);
}

}  // namespace torchquant::lut
