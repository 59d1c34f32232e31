// Calibration for GPTQ: the layer-wise Hessian H = 2 / n * sum_k x_k x_k^T of
// the squared error ||(W - W^) x||^2, averaged over the n inputs seen so far,
// updated one batch at a time with a single matrix product.
#include "gptq.h"

#include "gptq_args.h"

#include <ATen/ATen.h>

namespace torchquant::ptq {

void gptq_accumulate_hessian(at::Tensor& hessian, const at::Tensor& inputs, int64_t num_seen) {
  check_accumulate_hessian_args(hessian, inputs, num_seen);
  const int64_t in = hessian.size(0);
  const at::Tensor x = inputs.reshape({-1, in}).to(at::kFloat);
  const int64_t n = x.size(0);
  if (n == 0) return;
  // Calibration, not a training step: one host check per batch is fine, and a
  // single NaN would silently poison every later quantization of the layer.
  TORCH_CHECK_VALUE(at::isfinite(x).all().item<bool>(),
                    "torchquant.gptq_accumulate_hessian: inputs contain NaN or Inf");
  const double total = static_cast<double>(num_seen) + static_cast<double>(n);
  // H <- H * seen / total + (2 / total) * X^T X in one GEMM.
  hessian.addmm_(x.t(), x, /*beta=*/static_cast<double>(num_seen) / total, /*alpha=*/2.0 / total);
}

}  // namespace torchquant::ptq
