// Test data shared by the forward and autograd tests: one input shape per
// granularity, and random inputs / quantization parameters that reach both
// the clipped and the unclipped branches of the op.
#pragma once

#include "fake_quant_reference.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <ostream>
#include <string>
#include <vector>

namespace torchquant::testing {

// Signed 4 bits: coarse enough that random data is clipped on both sides.
constexpr int64_t kQuantMin = -8;
constexpr int64_t kQuantMax = 7;

struct FakeQuantCase {
  std::vector<int64_t> shape;
  Granularity granularity;
};

// Last dimensions are not multiples of the SIMD width, so the kernels' vector
// blocks and scalar tails both run; per-channel on the last axis takes the
// path where the grid changes with every element.
inline std::vector<FakeQuantCase> granularity_cases() {
  return {
      {{5, 7, 41}, per_tensor()},
      {{6, 5, 41}, per_channel(0)},
      {{4, 6, 41}, per_channel(1)},
      {{9, 37}, per_channel(-1)},
      {{3, 4, 96}, per_group(32)},
  };
}

inline std::string case_name(const ::testing::TestParamInfo<FakeQuantCase>& info) {
  return info.param.granularity.name;
}

inline std::ostream& operator<<(std::ostream& os, const FakeQuantCase& c) {
  return os << c.granularity.name << " of shape " << at::IntArrayRef(c.shape);
}

struct QParams {
  at::Tensor scale;       // float32 in [0.05, 0.2)
  at::Tensor zero_point;  // float32, integer-valued, inside [quant_min/2, quant_max/2]
};

inline QParams random_qparams(const FakeQuantCase& c, int64_t quant_min = kQuantMin,
                              int64_t quant_max = kQuantMax) {
  const std::vector<int64_t> shape = qparam_shape(c.shape, c.granularity);
  return {at::rand(shape) * 0.15 + 0.05,
          at::randint(quant_min / 2, quant_max / 2 + 1, shape, at::kFloat)};
}

inline at::Tensor random_input(at::IntArrayRef shape, at::ScalarType dtype = at::kFloat) {
  return (at::randn(shape) * 1.5).to(dtype);
}

}  // namespace torchquant::testing
