// AVX2 build of the GPTQ block kernel (see csrc/cpu/fake_quant_kernel_avx2.cpp).
#if !defined(CPU_CAPABILITY_AVX2)
#error "gptq_block_kernel_avx2.cpp must be compiled with the AVX2 flags"
#endif
#include "gptq_block_kernel_impl.h"
