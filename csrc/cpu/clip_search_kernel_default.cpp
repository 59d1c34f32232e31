// Baseline build of the clip-search kernel (see fake_quant_kernel_default.cpp).
#define CPU_CAPABILITY DEFAULT
#include "clip_search_kernel_impl.h"
