// AVX-512 build of the weight-only linear kernels (F/BW/VL/DQ). The build
// compiles this file alone with the AVX-512 flags and -DCPU_CAPABILITY=AVX512
// (setup.py, CMakeLists.txt); it runs only on CPUs that have them.
#if !defined(CPU_CAPABILITY_AVX512)
#error "quantized_linear_kernel_avx512.cpp must be compiled with the AVX-512 flags"
#endif
// GCC 12's AVX-512 intrinsics pass _mm512_undefined_*() as the unused
// merge operand, which -Wmaybe-uninitialized reports at every inlined use
// (GCC bug 105593, fixed in GCC 13).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "quantized_linear_kernel_impl.h"
