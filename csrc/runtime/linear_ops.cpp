#include "linear_ops.h"

#include <ATen/ATen.h>

#include <vector>

namespace torchquant {
namespace {

// Leading dims of x [..., last] times the new last dim.
std::vector<int64_t> with_last_dim(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = last;
  return sizes;
}

// x2 [M, K] (any float dtype), permuted columns -> float32 [M, Kp], zero padded.
// One conversion pass; skipped entirely when x is already what the kernels read.
at::Tensor padded_float_rows(const at::Tensor& x2, const at::Tensor& perm, int64_t k,
                             int64_t kp) {
  const at::Tensor cols = perm.defined() ? x2.index_select(1, perm) : x2;
  if (kp == k && cols.scalar_type() == at::kFloat && cols.is_contiguous()) return cols;
  at::Tensor out = at::empty({x2.size(0), kp}, x2.options().dtype(at::kFloat));
  out.narrow(1, 0, k).copy_(cols);
  if (kp > k) out.narrow(1, k, kp - k).zero_();
  return out;
}

}  // namespace

at::Tensor quantized_linear_with(const QuantLinearKernels& kernels, const at::Tensor& input,
                                 const at::Tensor& packed, const at::Tensor& scales,
                                 const at::Tensor& zeros, int64_t bits, int64_t in_features,
                                 const std::optional<at::Tensor>& lut,
                                 const std::optional<at::Tensor>& perm,
                                 const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "torchquant.quantized_linear";
  const c10::Device device = input.device();
  const PackedWeight w =
      check_packed_weight(op, packed, scales, zeros, bits, in_features, lut, device);
  check_activation(op, "input", input, in_features, "in_features");
  at::Tensor p;
  if (perm.has_value() && perm->defined())
    p = check_perm(op, *perm, in_features, device, kernels.check_values_on_host);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = check_bias(op, *bias, w.out_features, device);

  const int64_t k = in_features, n = w.out_features;
  const at::Tensor x2 = input.reshape({-1, k});
  const int64_t m = x2.size(0);
  at::Tensor y = at::empty({m, n}, input.options().dtype(at::kFloat));
  if (m > 0 && n > 0) {
    const at::Tensor x = padded_float_rows(x2, p, k, w.padded_in_features());
    kernels.linear(w, x, b, y);
  }
  return y.to(input.scalar_type()).view(with_last_dim(input, n));
}

at::Tensor quantized_linear_grad_input_with(const QuantLinearKernels& kernels,
                                            const at::Tensor& grad_output,
                                            const at::Tensor& packed, const at::Tensor& scales,
                                            const at::Tensor& zeros, int64_t bits,
                                            int64_t in_features,
                                            const std::optional<at::Tensor>& lut,
                                            const std::optional<at::Tensor>& perm) {
  constexpr const char* op = "torchquant.quantized_linear_grad_input";
  const c10::Device device = grad_output.device();
  const PackedWeight w =
      check_packed_weight(op, packed, scales, zeros, bits, in_features, lut, device);
  check_activation(op, "grad_output", grad_output, w.out_features, "out_features");
  at::Tensor p;
  if (perm.has_value() && perm->defined())
    p = check_perm(op, *perm, in_features, device, kernels.check_values_on_host);

  const int64_t k = in_features, n = w.out_features;
  const at::Tensor dy = grad_output.reshape({-1, n}).to(at::kFloat).contiguous();
  const int64_t m = dy.size(0);
  const auto out_shape = with_last_dim(grad_output, k);
  if (m == 0 || n == 0) return at::zeros(out_shape, grad_output.options());

  at::Tensor dx_pad = at::empty({m, w.padded_in_features()}, dy.options());
  kernels.grad_input(w, dy, dx_pad);
  at::Tensor dx = dx_pad.narrow(1, 0, k).to(grad_output.scalar_type());
  if (p.defined()) {
    // Column j of the kernel's result belongs to input column perm[j].
    at::Tensor out = at::empty({m, k}, dx.options());
    out.index_copy_(1, p, dx);
    dx = out;
  }
  return dx.contiguous().view(out_shape);
}

}  // namespace torchquant
