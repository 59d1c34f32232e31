// The factor GPTQ propagates errors with: M, upper triangular, with
// M M^T = H + damp * I. (The paper's code uses U = M^-1, the upper Cholesky
// factor of the inverse, U^T U = (H + damp I)^-1; see gptq.cpp for why M
// alone suffices.)
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace torchquant::ptq {

struct HessianFactor {
  at::Tensor upper;            // M, [n, n] float32, contiguous; undefined when every attempt failed
  double damp = 0.0;           // the damping of the attempt that succeeded
  std::vector<double> tried;   // every damping tried, in order
  bool ok() const { return upper.defined(); }
};

// Tries damp = percdamp * mean(diag(H)), then 10x, 100x, ... as long as the
// relative damping stays at most 1 (1x the mean diagonal: beyond that the
// "Hessian" is mostly the damping and GPTQ's error feedback is meaningless).
// An attempt fails when the Cholesky factorization finds a non-positive
// pivot (read from linalg_cholesky_ex's info, no exception) or a factor that
// is not finite. `hessian` is float32 [n, n], symmetric, with a positive mean
// diagonal; not modified.
HessianFactor damped_upper_cholesky(const at::Tensor& hessian, double percdamp);

}  // namespace torchquant::ptq
