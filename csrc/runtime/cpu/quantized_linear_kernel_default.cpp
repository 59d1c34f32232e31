// Baseline build of the weight-only linear kernels (no ISA flags): the
// portable fallback, and the reference the AVX2 / AVX-512 builds are tested
// against.
#define CPU_CAPABILITY DEFAULT
#include "quantized_linear_kernel_impl.h"
