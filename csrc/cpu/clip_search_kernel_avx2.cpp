// AVX2 build of the clip-search kernel (see fake_quant_kernel_avx2.cpp).
#if !defined(CPU_CAPABILITY_AVX2)
#error "clip_search_kernel_avx2.cpp must be compiled with the AVX2 flags"
#endif
#include "clip_search_kernel_impl.h"
