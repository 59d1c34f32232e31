// A reference of fake quantization and its gradients, written from the
// formulas with plain ATen tensor ops (broadcasting the quantization
// parameters) rather than from the kernels' channel layout, so the tests
// compare two independent implementations.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <optional>
#include <string>
#include <vector>

namespace torchquant::testing {

// Which elements share a (scale, zero_point) pair; the arguments of the op.
struct Granularity {
  std::optional<int64_t> axis;
  std::optional<int64_t> group_size;
  std::string name;  // for test names and failure messages
};

Granularity per_tensor();
Granularity per_channel(int64_t axis);
Granularity per_group(int64_t group_size);

// Shape the op expects for scale / zero_point of an input of `input_sizes`.
std::vector<int64_t> qparam_shape(at::IntArrayRef input_sizes, const Granularity& g);

// x^ = (clamp(round(x / scale) + zp, quant_min, quant_max) - zp) * scale, in
// float32 and returned in the dtype of `input`.
at::Tensor reference_fake_quantize(const at::Tensor& input, const at::Tensor& scale,
                                   const at::Tensor& zero_point, int64_t quant_min,
                                   int64_t quant_max, const Granularity& g);

struct ReferenceGrads {
  at::Tensor input;       // straight-through: grad_output where not clipped, else 0
  at::Tensor scale;       // LSQ: summed per channel / group, times grad_factor
  at::Tensor zero_point;  // LSQ+: summed per channel / group, times grad_factor
};
ReferenceGrads reference_grads(const at::Tensor& grad_output, const at::Tensor& input,
                               const at::Tensor& scale, const at::Tensor& zero_point,
                               int64_t quant_min, int64_t quant_max, const Granularity& g,
                               double grad_factor);

// Number of elements of `input` whose code falls below quant_min, inside the
// range, and above quant_max: lets a test check its data reaches every branch.
struct CodeCounts {
  int64_t below = 0;
  int64_t inside = 0;
  int64_t above = 0;
};
CodeCounts count_codes(const at::Tensor& input, const at::Tensor& scale,
                       const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                       const Granularity& g);

// Success when both tensors have the same dtype, shape and every element
// bit for bit; otherwise says how many elements differ and shows the first.
::testing::AssertionResult bit_equal(const at::Tensor& actual, const at::Tensor& expected);

// Success when |actual - expected| <= atol + rtol * |expected| everywhere;
// otherwise shows the largest difference.
::testing::AssertionResult all_close(const at::Tensor& actual, const at::Tensor& expected,
                                     double rtol, double atol);

}  // namespace torchquant::testing
