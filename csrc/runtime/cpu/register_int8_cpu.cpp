// CPU implementation of torchquant::w8a8_linear: argument checks, the choice
// of kernel for the running CPU, and the registration.
#include "int8_linear_kernel.h"

#include "../linear_args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

namespace torchquant::cpu::int8 {
namespace {

constexpr const char* kOp = "torchquant.w8a8_linear";

bool cpu_has_avx512_vnni() {
#if defined(TORCHQUANT_HAVE_AVX2_KERNELS) && (defined(__GNUC__) || defined(__clang__))
  // Every extension the AVX-512 build is compiled with.
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bf16") &&
         __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(TORCHQUANT_HAVE_AVX2_KERNELS) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// The widest kernel this CPU runs. TORCHQUANT_CPU_ISA=default or =avx2 caps
// it (to compare the builds, or to rule one out when debugging). The variable
// is read on every call (a few nanoseconds next to a GEMV of microseconds) so
// that one process can test every build; the CPU features are read once.
W8A8Kernel cpu_kernel() {
  static const bool avx512 = cpu_has_avx512_vnni();
  static const bool avx2 = cpu_has_avx2();
  const char* env = std::getenv("TORCHQUANT_CPU_ISA");
  const std::string cap = env == nullptr ? "" : env;
#if defined(TORCHQUANT_HAVE_AVX2_KERNELS)
  if (avx512 && cap != "default" && cap != "avx2") return &AVX512::w8a8_linear;
  if (avx2 && cap != "default") return &AVX2::w8a8_linear;
#else
  (void)avx512;
  (void)avx2;
#endif
  return &DEFAULT::w8a8_linear;
}

at::Tensor w8a8_linear_cpu(const at::Tensor& input, const at::Tensor& packed,
                           const at::Tensor& scales, const std::optional<at::Tensor>& input_scale,
                           const std::optional<at::Tensor>& bias, double outlier_threshold) {
  // dtype / device / shape checks shared with every backend.
  const W8A8Args a =
      check_w8a8_args(kOp, input, packed, scales, input_scale, bias, outlier_threshold);
  if (a.input_scale.defined()) {
    // The static scale lives in host memory here: checking its value is free.
    const float v = a.input_scale.const_data_ptr<float>()[0];
    TORCH_CHECK_VALUE(v > 0.0f && std::isfinite(v), kOp,
                      ": input_scale must be positive and finite, got ", v);
  }
  const int64_t K = a.in_features;
  const int64_t N = a.out_features;
  const at::Tensor x = input.contiguous();
  const int64_t M = x.numel() / K;  // tokens: every leading dimension
  std::vector<int64_t> out_shape = input.sizes().vec();
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, input.options());
  if (y.numel() == 0) return y;

  W8A8Problem p{};
  p.x = x.const_data_ptr();
  p.y = y.mutable_data_ptr();
  p.dtype = x.scalar_type();
  p.M = M;
  p.K = K;
  p.N = N;
  p.w = a.packed.const_data_ptr<uint8_t>();
  p.w_row_bytes = a.packed.size(1);
  p.w_scales = a.scales.const_data_ptr<float>();
  p.bias = a.bias.defined() ? a.bias.const_data_ptr<float>() : nullptr;
  p.input_scale = a.input_scale.defined() ? a.input_scale.const_data_ptr<float>() : nullptr;
  p.outlier_threshold = a.outlier_threshold;
  at::Tensor outlier_columns;
  if (a.outlier_threshold > 0.0f) {
    outlier_columns = at::zeros({K}, input.options().dtype(at::kByte));
    p.outlier_columns = outlier_columns.mutable_data_ptr<uint8_t>();
  }
  const int64_t bad = cpu_kernel()(p);
  TORCH_CHECK_VALUE(bad == 0, kOp, ": input must be ",
                    a.outlier_threshold > 0.0f ? "free of NaN" : "finite", ", but ", bad,
                    " of its ", M, " rows (tokens) contain ",
                    a.outlier_threshold > 0.0f ? "NaN" : "NaN or Inf");
  if (outlier_columns.defined()) {
    add_outlier_product(a, x.view({M, K}), outlier_columns, y.view({M, N}));
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchquant, CPU, m) {
  m.impl("w8a8_linear", &w8a8_linear_cpu);
}

}  // namespace torchquant::cpu::int8
