// AVX-512 build of the W8A8 CPU kernel (F, BW, VL, DQ, VNNI, BF16: Ice Lake,
// Zen 4 and newer). The build compiles this file alone with those -m flags and
// -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512 (see setup.py and
// CMakeLists.txt); it is chosen at run time only on CPUs that have them all.
#if !defined(CPU_CAPABILITY_AVX512)
#error "int8_linear_kernel_avx512.cpp must be compiled with the AVX-512 flags"
#endif
#include "int8_linear_kernel_impl.h"
