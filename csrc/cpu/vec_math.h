// The primitives quant_math.h needs, for at::vec::Vectorized<float>, so the
// same element math runs on whole SIMD registers.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>

namespace torchquant {
// Vectorized<float>::round rounds half to even, as std::nearbyint does.
inline at::vec::Vectorized<float> qm_round(const at::vec::Vectorized<float>& v) {
  return v.round();
}
inline at::vec::Vectorized<float> qm_min(const at::vec::Vectorized<float>& a,
                                         const at::vec::Vectorized<float>& b) {
  return at::vec::minimum(a, b);
}
inline at::vec::Vectorized<float> qm_max(const at::vec::Vectorized<float>& a,
                                         const at::vec::Vectorized<float>& b) {
  return at::vec::maximum(a, b);
}
// a * b + c rounded once: the FMA instruction where the build has it, the
// correctly rounded std::fma per lane otherwise (never an unfused a * b + c,
// which would make the baseline build round differently from the AVX2 one).
inline at::vec::Vectorized<float> qm_fma(const at::vec::Vectorized<float>& a,
                                         const at::vec::Vectorized<float>& b,
                                         const at::vec::Vectorized<float>& c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return at::vec::fmadd(a, b, c);
#else
  constexpr int n = at::vec::Vectorized<float>::size();
  __at_align__ float av[n], bv[n], cv[n];
  a.store(av);
  b.store(bv);
  c.store(cv);
  for (int i = 0; i < n; ++i) av[i] = std::fma(av[i], bv[i], cv[i]);
  return at::vec::Vectorized<float>::loadu(av);
#endif
}

// `mask` is the all-ones / all-zeros lane mask a Vectorized comparison returns.
inline at::vec::Vectorized<float> qm_select(const at::vec::Vectorized<float>& mask,
                                            const at::vec::Vectorized<float>& a,
                                            const at::vec::Vectorized<float>& b) {
  return at::vec::Vectorized<float>::blendv(b, a, mask);
}

}  // namespace torchquant
