// The GPTQ block kernel for the running CPU.
#include "../gptq_block.h"

#include "../../cpu/fake_quant_kernel.h"

namespace torchquant::ptq {
namespace cpu {
namespace DEFAULT {
void gptq_block(const GptqBlock& b);
}
#if defined(TORCHQUANT_HAVE_AVX2_KERNELS)
namespace AVX2 {
void gptq_block(const GptqBlock& b);
}
#endif
}  // namespace cpu

GptqBlockKernel cpu_gptq_block_kernel() {
#if defined(TORCHQUANT_HAVE_AVX2_KERNELS)
  // The instruction set the fake-quant kernels were chosen for: one decision
  // per process, TORCHQUANT_CPU_ISA=default included.
  static const bool use_avx2 =
      torchquant::cpu::cpu_kernels().forward == &torchquant::cpu::AVX2::forward;
  if (use_avx2) return &cpu::AVX2::gptq_block;
#endif
  return &cpu::DEFAULT::gptq_block;
}

}  // namespace torchquant::ptq
