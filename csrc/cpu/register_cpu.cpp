// CPU registrations of the fake-quantize ops, with the kernels picked for the
// instruction set of the running CPU.
#include "fake_quant_kernel.h"

#include <torch/library.h>

#include <cstdlib>
#include <string>

namespace torchquant::cpu {
namespace {

// TORCHQUANT_CPU_ISA=default forces the baseline kernels (to compare the
// two builds, or to rule the AVX2 path out when debugging).
bool cpu_has_avx2() {
#if defined(TORCHQUANT_HAVE_AVX2_KERNELS) && (defined(__GNUC__) || defined(__clang__))
  const char* forced = std::getenv("TORCHQUANT_CPU_ISA");
  if (forced != nullptr && std::string(forced) == "default") return false;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

}  // namespace

const FakeQuantKernels& cpu_kernels() {
#if defined(TORCHQUANT_HAVE_AVX2_KERNELS)
  static const FakeQuantKernels avx2{&AVX2::forward, &AVX2::ste_backward,
                                     &AVX2::learnable_backward, /*check_values_on_host=*/true};
#endif
  static const FakeQuantKernels baseline{&DEFAULT::forward, &DEFAULT::ste_backward,
                                         &DEFAULT::learnable_backward,
                                         /*check_values_on_host=*/true};
#if defined(TORCHQUANT_HAVE_AVX2_KERNELS)
  static const bool use_avx2 = cpu_has_avx2();
  if (use_avx2) return avx2;
#endif
  return baseline;
}

ClipSearchKernel cpu_clip_search_kernel() {
#if defined(TORCHQUANT_HAVE_AVX2_KERNELS)
  static const bool use_avx2 = cpu_has_avx2();
  if (use_avx2) return &AVX2::clip_search;
#endif
  return &DEFAULT::clip_search;
}

namespace {

at::Tensor fake_quantize_cpu(const at::Tensor& input, const at::Tensor& scale,
                             const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                             std::optional<int64_t> axis, std::optional<int64_t> group_size,
                             double grad_factor) {
  return fake_quantize_with(cpu_kernels(), input, scale, zero_point, quant_min, quant_max, axis,
                            group_size, grad_factor);
}

at::Tensor fake_quantize_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                      const at::Tensor& scale, const at::Tensor& zero_point,
                                      int64_t quant_min, int64_t quant_max,
                                      std::optional<int64_t> axis,
                                      std::optional<int64_t> group_size) {
  return fake_quantize_backward_with(cpu_kernels(), grad_output, input, scale, zero_point,
                                     quant_min, quant_max, axis, group_size);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_learnable_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
    std::optional<int64_t> axis, std::optional<int64_t> group_size, double grad_factor) {
  return fake_quantize_learnable_backward_with(cpu_kernels(), grad_output, input, scale,
                                               zero_point, quant_min, quant_max, axis, group_size,
                                               grad_factor);
}

std::tuple<at::Tensor, at::Tensor> mse_clip_search_cpu(
    const at::Tensor& input, const at::Tensor& min_val, const at::Tensor& max_val,
    int64_t quant_min, int64_t quant_max, bool symmetric, std::optional<int64_t> axis,
    std::optional<int64_t> group_size, int64_t steps, double max_shrink, double norm) {
  return mse_clip_search_with(cpu_clip_search_kernel(), input, min_val, max_val, quant_min,
                              quant_max, symmetric, axis, group_size, steps, max_shrink, norm);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchquant, CPU, m) {
  m.impl("fake_quantize", &fake_quantize_cpu);
  m.impl("fake_quantize_backward", &fake_quantize_backward_cpu);
  m.impl("fake_quantize_learnable_backward", &fake_quantize_learnable_backward_cpu);
  m.impl("mse_clip_search", &mse_clip_search_cpu);
}

}  // namespace torchquant::cpu
