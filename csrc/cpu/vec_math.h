// The primitives quant_math.h needs, for at::vec::Vectorized<float>, so the
// same element math runs on whole SIMD registers.
#pragma once

#include <ATen/cpu/vec/vec.h>

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
// `mask` is the all-ones / all-zeros lane mask a Vectorized comparison returns.
inline at::vec::Vectorized<float> qm_select(const at::vec::Vectorized<float>& mask,
                                            const at::vec::Vectorized<float>& a,
                                            const at::vec::Vectorized<float>& b) {
  return at::vec::Vectorized<float>::blendv(b, a, mask);
}

}  // namespace torchquant
