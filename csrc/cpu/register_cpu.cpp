// CPU registrations of the torchquant ops, with the kernels picked for the
// instruction set of the running CPU.
#include "fake_quant_kernel.h"

#include "../register_backend.h"

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

TORCH_LIBRARY_IMPL(torchquant, CPU, m) {
  register_backend_ops<&cpu_kernels, &cpu_clip_search_kernel>(m);
}

}  // namespace torchquant::cpu
