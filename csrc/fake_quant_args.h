// Argument checking and normalisation shared by every backend of the
// fake-quantize ops. A backend kernel only ever sees a FakeQuantArgs: a
// contiguous input viewed as [outer, channels, inner] and one float scale and
// one rounded float zero-point per channel.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace torchquant {

// The input viewed as [outer, channels, inner]; element i uses the grid of
// channel (i / inner) % channels.
//   per-tensor:          outer = 1, channels = 1,        inner = numel
//   per-channel (axis):  outer = prod(sizes[:axis]), channels = sizes[axis],
//                        inner = prod(sizes[axis+1:])
//   per-group (size g):  outer = 1, channels = numel / g, inner = g
struct ChannelLayout {
  int64_t outer = 1;
  int64_t channels = 1;
  int64_t inner = 1;
};

struct FakeQuantArgs {
  at::Tensor input;   // contiguous, float32 / float16 / bfloat16
  at::Tensor scale;   // float32, contiguous, [channels]
  at::Tensor zero;    // float32, contiguous, [channels], integer-valued
  ChannelLayout layout;
  float quant_min = 0.0f;
  float quant_max = 0.0f;
};

// The granularity of a call: how the input maps onto grids, and the shape
// every per-grid tensor (scale, zero_point, min_val, ...) must have.
struct GridShape {
  ChannelLayout layout;
  std::vector<int64_t> per_grid_shape;
  const char* granularity = "per-tensor";
};

// Checks the input dtype, the code range and the granularity arguments.
GridShape check_grid_args(
    const char* op_name,
    const at::Tensor& input,
    int64_t quant_min,
    int64_t quant_max,
    std::optional<int64_t> axis,
    std::optional<int64_t> group_size);

// Checks that a per-grid tensor `name` has the device and shape `grid` needs.
void check_per_grid_tensor(
    const char* op_name,
    const char* name,
    const at::Tensor& t,
    const at::Tensor& input,
    const GridShape& grid);

// Checks every argument (dtype, device, shapes, range) and raises a
// TypeError / ValueError naming the argument and what was expected. Value
// checks of scale and zero_point are the backend's business because on a GPU
// they would need a host synchronisation.
FakeQuantArgs prepare_fake_quant_args(
    const char* op_name,
    const at::Tensor& input,
    const at::Tensor& scale,
    const at::Tensor& zero_point,
    int64_t quant_min,
    int64_t quant_max,
    std::optional<int64_t> axis,
    std::optional<int64_t> group_size);

// The same checks for a gradient flowing into a backward op.
at::Tensor prepare_grad_output(
    const char* op_name,
    const at::Tensor& grad_output,
    const at::Tensor& input);

// Value checks on host-resident qparams: scale positive and finite,
// rounded zero-point inside [quant_min, quant_max].
void check_qparam_values_on_host(const char* op_name, const FakeQuantArgs& args);

}  // namespace torchquant
