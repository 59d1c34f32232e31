// MSE-optimal clipping: for each grid (tensor, channel or group), try
// shrinking the observed range [lo, hi] by factors 1, 1 - d, 1 - 2d, ...
// (d = max_shrink / steps) and keep the grid whose fake-quantized values are
// closest to the input in the L^norm sense. The device-independent half of
// the op lives here; backends supply the error kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <optional>
#include <tuple>

namespace torchquant {

// The input rearranged so that each grid's elements are one contiguous row.
struct ClipSearchArgs {
  at::Tensor rows;   // [grids, elements_per_grid], float32/16/bf16, contiguous
  at::Tensor lo;     // [grids] float32
  at::Tensor hi;     // [grids] float32
  float quant_min = 0.0f;
  float quant_max = 0.0f;
  bool symmetric = true;
  int64_t steps = 100;
  float max_shrink = 0.8f;
  float norm = 2.0f;
};

// Kernel: fills err/scale/zero, each [grids, steps] float32, with the
// L^norm error and the grid of every candidate shrink factor.
using ClipSearchKernel = void (*)(const ClipSearchArgs& args, at::Tensor& err,
                                  at::Tensor& scale, at::Tensor& zero);

std::tuple<at::Tensor, at::Tensor> mse_clip_search_with(
    ClipSearchKernel kernel,
    const at::Tensor& input,
    const at::Tensor& min_val,
    const at::Tensor& max_val,
    int64_t quant_min,
    int64_t quant_max,
    bool symmetric,
    std::optional<int64_t> axis,
    std::optional<int64_t> group_size,
    int64_t steps,
    double max_shrink,
    double norm);

// Smallest scale a grid may have, as in the Python observers.
constexpr float kMinScale = 1.1920928955078125e-07f;  // float32 epsilon

// The factor candidate k (0 <= k < steps) shrinks [lo, hi] by:
// 1 - k * max_shrink / steps, in float32 and in this order of operations on
// every backend, so that all of them try the same grids bit for bit.
C10_HOST_DEVICE inline float candidate_shrink(int64_t k, int64_t steps, float max_shrink) {
  return 1.0f - static_cast<float>(k) * max_shrink / static_cast<float>(steps);
}

}  // namespace torchquant
