// Baseline build of the W8A8 CPU kernel: whatever vector width the
// compiler's default target allows (SSE2 on x86-64, NEON on Arm).
#define CPU_CAPABILITY DEFAULT
#include "int8_linear_kernel_impl.h"
