#include "fake_quant_ops.h"

#include <ATen/ATen.h>

namespace torchquant {
namespace {

FakeQuantArgs prepare(const FakeQuantKernels& kernels, const char* op, const at::Tensor& input,
                      const at::Tensor& scale, const at::Tensor& zero_point, int64_t quant_min,
                      int64_t quant_max, std::optional<int64_t> axis,
                      std::optional<int64_t> group_size) {
  FakeQuantArgs args = prepare_fake_quant_args(op, input, scale, zero_point, quant_min,
                                               quant_max, axis, group_size);
  if (kernels.check_values_on_host) {
    check_qparam_values_on_host(op, args);
  }
  return args;
}

}  // namespace

at::Tensor fake_quantize_with(
    const FakeQuantKernels& kernels,
    const at::Tensor& input,
    const at::Tensor& scale,
    const at::Tensor& zero_point,
    int64_t quant_min,
    int64_t quant_max,
    std::optional<int64_t> axis,
    std::optional<int64_t> group_size,
    double grad_factor) {
  constexpr const char* op = "torchquant.fake_quantize";
  (void)grad_factor;  // only the backward uses it
  const FakeQuantArgs args =
      prepare(kernels, op, input, scale, zero_point, quant_min, quant_max, axis, group_size);
  at::Tensor out = at::empty_like(args.input, at::MemoryFormat::Contiguous);
  if (out.numel() > 0) {
    kernels.forward(args, out);
  }
  return out;
}

at::Tensor fake_quantize_backward_with(
    const FakeQuantKernels& kernels,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& scale,
    const at::Tensor& zero_point,
    int64_t quant_min,
    int64_t quant_max,
    std::optional<int64_t> axis,
    std::optional<int64_t> group_size) {
  constexpr const char* op = "torchquant.fake_quantize_backward";
  const FakeQuantArgs args =
      prepare(kernels, op, input, scale, zero_point, quant_min, quant_max, axis, group_size);
  const at::Tensor dy = prepare_grad_output(op, grad_output, args.input);
  at::Tensor dx = at::empty_like(args.input, at::MemoryFormat::Contiguous);
  if (dx.numel() > 0) {
    kernels.ste_backward(args, dy, dx);
  }
  return dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_learnable_backward_with(
    const FakeQuantKernels& kernels,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& scale,
    const at::Tensor& zero_point,
    int64_t quant_min,
    int64_t quant_max,
    std::optional<int64_t> axis,
    std::optional<int64_t> group_size,
    double grad_factor) {
  constexpr const char* op = "torchquant.fake_quantize_learnable_backward";
  const FakeQuantArgs args =
      prepare(kernels, op, input, scale, zero_point, quant_min, quant_max, axis, group_size);
  const at::Tensor dy = prepare_grad_output(op, grad_output, args.input);
  at::Tensor dx = at::empty_like(args.input, at::MemoryFormat::Contiguous);
  at::Tensor dscale;
  at::Tensor dzero;
  if (dx.numel() > 0) {
    // The partials are tiny next to the input (one float per piece of a
    // channel), so their final reduction is left to ATen.
    const at::Tensor partial = kernels.learnable_backward(args, dy, dx);
    const at::Tensor sums = partial.sum({1, 3}).mul_(grad_factor);
    dscale = sums[0];
    dzero = sums[1];
  } else {
    dscale = at::zeros({args.layout.channels}, scale.options());
    dzero = at::zeros({args.layout.channels}, scale.options());
  }
  return {dx, dscale.reshape(scale.sizes()).clone(), dzero.reshape(zero_point.sizes()).clone()};
}

}  // namespace torchquant
