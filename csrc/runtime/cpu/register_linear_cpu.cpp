// CPU registrations of the weight-only linear ops, with the kernel table
// picked for the instruction set of the running CPU.
#include "quantized_linear_kernel.h"

#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>

namespace torchquant::cpu {
namespace {

// TORCHQUANT_CPU_ISA=default|avx2 forces a narrower set than the CPU offers
// (to compare the builds, or to rule the wide paths out when debugging).
std::string forced_isa() {
  const char* forced = std::getenv("TORCHQUANT_CPU_ISA");
  return forced == nullptr ? std::string() : std::string(forced);
}

bool cpu_supports(const std::string& isa) {
  if (isa == "default") return true;
#if defined(TORCHQUANT_HAVE_AVX2_KERNELS) && (defined(__GNUC__) || defined(__clang__))
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (isa == "avx2") return avx2;
  if (isa == "avx512") {
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
#endif
  return false;
}

}  // namespace

const QuantLinearKernels* quantized_linear_kernels_for(const std::string& isa) {
  static const QuantLinearKernels baseline{&DEFAULT::quantized_linear,
                                           &DEFAULT::quantized_linear_grad_input,
                                           /*check_values_on_host=*/true};
#if defined(TORCHQUANT_HAVE_AVX2_KERNELS)
  static const QuantLinearKernels avx2{&AVX2::quantized_linear, &AVX2::quantized_linear_grad_input,
                                       /*check_values_on_host=*/true};
  static const QuantLinearKernels avx512{&AVX512::quantized_linear,
                                         &AVX512::quantized_linear_grad_input,
                                         /*check_values_on_host=*/true};
#endif
  if (!cpu_supports(isa)) return nullptr;
  if (isa == "default") return &baseline;
#if defined(TORCHQUANT_HAVE_AVX2_KERNELS)
  if (isa == "avx2") return &avx2;
  if (isa == "avx512") return &avx512;
#endif
  return nullptr;
}

const QuantLinearKernels& quantized_linear_kernels() {
  static const QuantLinearKernels* chosen = [] {
    const std::string forced = forced_isa();
    // The widest set the CPU has, but no wider than the one asked for.
    const char* order[] = {"avx512", "avx2", "default"};
    bool allowed = forced.empty();
    for (const char* isa : order) {
      allowed = allowed || forced == isa;
      if (!allowed) continue;
      if (const QuantLinearKernels* k = quantized_linear_kernels_for(isa)) return k;
    }
    return quantized_linear_kernels_for("default");
  }();
  return *chosen;
}

namespace {

at::Tensor quantized_linear_cpu(const at::Tensor& input, const at::Tensor& packed,
                                const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                                int64_t in_features, const std::optional<at::Tensor>& lut,
                                const std::optional<at::Tensor>& perm,
                                const std::optional<at::Tensor>& bias) {
  return quantized_linear_with(quantized_linear_kernels(), input, packed, scales, zeros, bits,
                               in_features, lut, perm, bias);
}

at::Tensor quantized_linear_grad_input_cpu(const at::Tensor& grad_output, const at::Tensor& packed,
                                           const at::Tensor& scales, const at::Tensor& zeros,
                                           int64_t bits, int64_t in_features,
                                           const std::optional<at::Tensor>& lut,
                                           const std::optional<at::Tensor>& perm) {
  return quantized_linear_grad_input_with(quantized_linear_kernels(), grad_output, packed, scales,
                                          zeros, bits, in_features, lut, perm);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchquant, CPU, m) {
  m.impl("quantized_linear", TORCH_FN(quantized_linear_cpu));
  m.impl("quantized_linear_grad_input", TORCH_FN(quantized_linear_grad_input_cpu));
}

}  // namespace torchquant::cpu
