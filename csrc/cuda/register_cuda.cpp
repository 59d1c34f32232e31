// CUDA registrations of the fake-quantize ops. Host code only: the kernels
// are in the .cu files next to it.
#include "fake_quant_cuda.h"

#include <torch/library.h>

namespace torchquant::cuda {
namespace {

// scale / zero_point stay on the GPU: the kernels poison bad channels with
// NaN instead of a host-side check (see fake_quant_cuda.h).
const FakeQuantKernels kCudaKernels{&forward, &ste_backward, &learnable_backward,
                                    /*check_values_on_host=*/false};

at::Tensor fake_quantize_cuda(const at::Tensor& input, const at::Tensor& scale,
                              const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                              std::optional<int64_t> axis, std::optional<int64_t> group_size,
                              double grad_factor) {
  return fake_quantize_with(kCudaKernels, input, scale, zero_point, quant_min, quant_max, axis,
                            group_size, grad_factor);
}

at::Tensor fake_quantize_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                       const at::Tensor& scale, const at::Tensor& zero_point,
                                       int64_t quant_min, int64_t quant_max,
                                       std::optional<int64_t> axis,
                                       std::optional<int64_t> group_size) {
  return fake_quantize_backward_with(kCudaKernels, grad_output, input, scale, zero_point,
                                     quant_min, quant_max, axis, group_size);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_learnable_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
    std::optional<int64_t> axis, std::optional<int64_t> group_size, double grad_factor) {
  return fake_quantize_learnable_backward_with(kCudaKernels, grad_output, input, scale,
                                               zero_point, quant_min, quant_max, axis, group_size,
                                               grad_factor);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchquant, CUDA, m) {
  m.impl("fake_quantize", &fake_quantize_cuda);
  m.impl("fake_quantize_backward", &fake_quantize_backward_cuda);
  m.impl("fake_quantize_learnable_backward", &fake_quantize_learnable_backward_cuda);
}

}  // namespace torchquant::cuda
