// The upper factor comes from the ordinary (lower) Cholesky factorization of
// the Hessian with its rows and columns reversed: with J the reversal
// permutation, J H J = L L^T gives H = (J L J)(J L J)^T, and J L J is upper
// triangular.
#include "gptq_damped_cholesky.h"

#include <ATen/ATen.h>

namespace torchquant::ptq {

HessianFactor damped_upper_cholesky(const at::Tensor& hessian, double percdamp) {
  HessianFactor result;
  const double mean_diag = hessian.diagonal().mean().item<double>();
  // The relative damping grows 10x per attempt up to 1 (with slack for the
  // rounding of the repeated products, so that 0.01 -> 0.1 -> 1 tries 1).
  for (double relative = percdamp; relative <= 1.0 + 1e-9; relative *= 10.0) {
    const double damp = relative * mean_diag;
    result.tried.push_back(damp);
    // Reversed (a copy); the damping only touches the diagonal, which
    // reversal maps onto itself.
    at::Tensor damped = hessian.flip({0, 1});
    damped.diagonal().add_(damp);
    auto [lower, info] = at::linalg_cholesky_ex(damped, /*upper=*/false, /*check_errors=*/false);
    if (info.item<int>() != 0) continue;
    // Positive pivots, but a Hessian near float32's range could still overflow.
    if (!at::isfinite(lower).all().item<bool>()) continue;
    result.upper = lower.flip({0, 1}).contiguous();
    result.damp = damp;
    return result;
  }
  return result;
}

}  // namespace torchquant::ptq
