// Baseline build of the GPTQ block kernel (see csrc/cpu/fake_quant_kernel_default.cpp).
#define CPU_CAPABILITY DEFAULT
#include "gptq_block_kernel_impl.h"
