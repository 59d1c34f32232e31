// The operator implementations of one backend (dispatch key). Each op only
// forwards to its device-independent body (fake_quant_ops.h, clip_search.h)
// with the backend's kernels, so a backend's registration is one call:
//
//   TORCH_LIBRARY_IMPL(torchquant, CPU, m) {
//     register_backend_ops<&cpu_kernels, &cpu_clip_search_kernel>(m);
//   }
//
// The kernels are asked for on every call (not captured at registration), so
// a getter may pick them at run time, e.g. by the CPU's instruction set.
#pragma once

#include "clip_search.h"
#include "fake_quant_ops.h"

#include <torch/library.h>

#include <optional>
#include <tuple>

namespace torchquant {

template <const FakeQuantKernels& (*Kernels)(), ClipSearchKernel (*ClipSearch)()>
struct BackendOps {
  static at::Tensor fake_quantize(const at::Tensor& input, const at::Tensor& scale,
                                  const at::Tensor& zero_point, int64_t quant_min,
                                  int64_t quant_max, std::optional<int64_t> axis,
                                  std::optional<int64_t> group_size, double grad_factor) {
    return fake_quantize_with(Kernels(), input, scale, zero_point, quant_min, quant_max, axis,
                              group_size, grad_factor);
  }

  static at::Tensor fake_quantize_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                           const at::Tensor& scale, const at::Tensor& zero_point,
                                           int64_t quant_min, int64_t quant_max,
                                           std::optional<int64_t> axis,
                                           std::optional<int64_t> group_size) {
    return fake_quantize_backward_with(Kernels(), grad_output, input, scale, zero_point,
                                       quant_min, quant_max, axis, group_size);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_learnable_backward(
      const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& scale,
      const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
      std::optional<int64_t> axis, std::optional<int64_t> group_size, double grad_factor) {
    return fake_quantize_learnable_backward_with(Kernels(), grad_output, input, scale, zero_point,
                                                 quant_min, quant_max, axis, group_size,
                                                 grad_factor);
  }

  static std::tuple<at::Tensor, at::Tensor> mse_clip_search(
      const at::Tensor& input, const at::Tensor& min_val, const at::Tensor& max_val,
      int64_t quant_min, int64_t quant_max, bool symmetric, std::optional<int64_t> axis,
      std::optional<int64_t> group_size, int64_t steps, double max_shrink, double norm) {
    return mse_clip_search_with(ClipSearch(), input, min_val, max_val, quant_min, quant_max,
                                symmetric, axis, group_size, steps, max_shrink, norm);
  }
};

// Registers every op of the torchquant library that has a per-device kernel
// (all but the autograd wrappers) at the dispatch key of `m`.
template <const FakeQuantKernels& (*Kernels)(), ClipSearchKernel (*ClipSearch)()>
void register_backend_ops(torch::Library& m) {
  using Ops = BackendOps<Kernels, ClipSearch>;
  m.impl("fake_quantize", TORCH_FN(Ops::fake_quantize));
  m.impl("fake_quantize_backward", TORCH_FN(Ops::fake_quantize_backward));
  m.impl("fake_quantize_learnable_backward", TORCH_FN(Ops::fake_quantize_learnable_backward));
  m.impl("mse_clip_search", TORCH_FN(Ops::mse_clip_search));
}

}  // namespace torchquant
