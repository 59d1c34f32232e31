// Baseline build of the CPU kernels: whatever vector width the compiler's
// default target allows (SSE2 on x86-64, NEON on Arm).
#define CPU_CAPABILITY DEFAULT
#include "fake_quant_kernel_impl.h"
