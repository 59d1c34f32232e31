// AVX2 build of the W8A8 CPU kernel. The build compiles this file alone with
// -mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 (see setup.py
// and CMakeLists.txt); it is chosen at run time only on CPUs that have AVX2.
#if !defined(CPU_CAPABILITY_AVX2)
#error "int8_linear_kernel_avx2.cpp must be compiled with the AVX2 flags"
#endif
#include "int8_linear_kernel_impl.h"
