// CPU kernels of the weight-only linear ops, declared once per instruction
// set (quantized_linear_kernel_impl.h is compiled once per set) and the table
// chosen at run time by register_linear_cpu.cpp.
#pragma once

#include "../linear_ops.h"

#include <string>

namespace torchquant::cpu {

#define TORCHQUANT_DECLARE_LINEAR_KERNELS(CAPABILITY)                                      \
  namespace CAPABILITY {                                                                   \
  void quantized_linear(const PackedWeight& w, const at::Tensor& x, const at::Tensor& bias, \
                        at::Tensor& y);                                                    \
  void quantized_linear_grad_input(const PackedWeight& w, const at::Tensor& dy,            \
                                   at::Tensor& dx);                                        \
  }

TORCHQUANT_DECLARE_LINEAR_KERNELS(DEFAULT)
#if defined(TORCHQUANT_HAVE_AVX2_KERNELS)
TORCHQUANT_DECLARE_LINEAR_KERNELS(AVX2)
TORCHQUANT_DECLARE_LINEAR_KERNELS(AVX512)
#endif

#undef TORCHQUANT_DECLARE_LINEAR_KERNELS

// The table of the widest instruction set this CPU supports, or the one that
// TORCHQUANT_CPU_ISA=default|avx2|avx512 asks for (never wider than the CPU).
const QuantLinearKernels& quantized_linear_kernels();

// The table of one instruction set ("default", "avx2", "avx512"), or nullptr
// when this build or this CPU lacks it (for tests comparing the sets).
const QuantLinearKernels* quantized_linear_kernels_for(const std::string& isa);

}  // namespace torchquant::cpu
