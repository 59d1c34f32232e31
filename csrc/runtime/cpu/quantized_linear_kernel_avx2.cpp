// AVX2 build of the weight-only linear kernels. The build compiles this file
// alone with -mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2 (setup.py,
// CMakeLists.txt); it runs only on CPUs that have AVX2 and FMA.
#if !defined(CPU_CAPABILITY_AVX2)
#error "quantized_linear_kernel_avx2.cpp must be compiled with the AVX2 flags"
#endif
#include "quantized_linear_kernel_impl.h"
