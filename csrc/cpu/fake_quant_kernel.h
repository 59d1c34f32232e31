// CPU kernels, declared once per instruction set. Each implementation
// (fake_quant_kernel_impl.h, clip_search_kernel_impl.h) is compiled once per
// instruction set and the
// widest one the running CPU supports is chosen at run time, so a wheel built
// with AVX2 kernels still runs on a CPU without AVX2.
#pragma once

#include "../clip_search.h"
#include "../fake_quant_ops.h"

namespace torchquant::cpu {

#define TORCHQUANT_DECLARE_CPU_KERNELS(CAPABILITY)                                     \
  namespace CAPABILITY {                                                               \
  void forward(const FakeQuantArgs& args, at::Tensor& out);                            \
  void ste_backward(const FakeQuantArgs& args, const at::Tensor& grad_output,          \
                    at::Tensor& grad_input);                                           \
  at::Tensor learnable_backward(const FakeQuantArgs& args, const at::Tensor& grad_output, \
                                at::Tensor& grad_input);                               \
  void clip_search(const ClipSearchArgs& args, at::Tensor& err, at::Tensor& scale,           \
                   at::Tensor& zero);                                                      \
  }

TORCHQUANT_DECLARE_CPU_KERNELS(DEFAULT)
#if defined(TORCHQUANT_HAVE_AVX2_KERNELS)
TORCHQUANT_DECLARE_CPU_KERNELS(AVX2)
#endif

#undef TORCHQUANT_DECLARE_CPU_KERNELS

// The kernel table for the best instruction set of this CPU.
const FakeQuantKernels& cpu_kernels();

// The clip-search kernel for the best instruction set of this CPU.
ClipSearchKernel cpu_clip_search_kernel();

}  // namespace torchquant::cpu
