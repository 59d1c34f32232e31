// Bad arguments to the public C++ API raise c10::TypeError (wrong dtype) or
// c10::ValueError (wrong value or shape) with a message naming the argument,
// and the edge values just inside the limits are accepted.
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <torchquant/torchquant.h>

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <string>
#include <utility>

namespace torchquant::testing {
namespace {

// Success when `call` throws exactly `Error` and its message mentions
// `argument`.
template <typename Error, typename Call>
::testing::AssertionResult raises(const Call& call, const std::string& argument) {
  try {
    call();
  } catch (const Error& e) {
    if (e.msg().find(argument) != std::string::npos) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "message does not name '" << argument << "': "
                                         << e.msg();
  } catch (const c10::Error& e) {
    return ::testing::AssertionFailure() << "wrong exception type: " << e.msg();
  }
  return ::testing::AssertionFailure() << "no exception";
}

using QuantRange = std::pair<int64_t, int64_t>;

// Valid arguments of a signed 4-bit fake-quantize; each test spoils one.
class FakeQuantizeErrors : public ::testing::Test {
 protected:
  at::Tensor x = at::randn({4, 8});
  at::Tensor scale = at::full({1}, 0.1f);
  at::Tensor zero_point = at::zeros({1});
  int64_t quant_min = -8;
  int64_t quant_max = 7;

  auto call(std::optional<int64_t> axis = std::nullopt,
            std::optional<int64_t> group_size = std::nullopt) {
    return [=, this] {
      torchquant::fake_quantize(x, scale, zero_point, quant_min, quant_max, axis, group_size);
    };
  }
};

TEST_F(FakeQuantizeErrors, ValidArgumentsAreAccepted) {
  EXPECT_NO_THROW(call()());
}

TEST_F(FakeQuantizeErrors, NonPositiveScale) {
  for (const float bad : {0.0f, -0.1f}) {
    scale = at::full({1}, bad);
    EXPECT_TRUE(raises<c10::ValueError>(call(), "scale")) << "scale " << bad;
  }
}

TEST_F(FakeQuantizeErrors, NonFiniteScale) {
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(),
                          std::numeric_limits<float>::infinity()}) {
    scale = at::full({1}, bad);
    EXPECT_TRUE(raises<c10::ValueError>(call(), "scale")) << "scale " << bad;
  }
}

TEST_F(FakeQuantizeErrors, ZeroPointOutsideRange) {
  for (const float bad : {8.0f, -9.0f, 7.6f}) {
    zero_point = at::full({1}, bad);
    EXPECT_TRUE(raises<c10::ValueError>(call(), "zero_point")) << "zero_point " << bad;
  }
  zero_point = at::full({1}, 7.4f);  // rounds to 7, the top of the range
  EXPECT_NO_THROW(call()());
}

TEST_F(FakeQuantizeErrors, EmptyQuantRange) {
  for (const auto& [lo, hi] : {QuantRange{7, 7}, QuantRange{7, -8}}) {
    quant_min = lo;
    quant_max = hi;
    zero_point = at::full({1}, static_cast<float>(hi));
    EXPECT_TRUE(raises<c10::ValueError>(call(), "quant_min")) << lo << ", " << hi;
  }
}

TEST_F(FakeQuantizeErrors, MoreThanSixteenBits) {
  // 17-bit unsigned, 17-bit signed, and a range within the 16-bit bounds
  // that still spans more than 2^16 levels.
  for (const auto& [lo, hi] : {QuantRange{0, (1 << 17) - 1},
                               QuantRange{-(1 << 16), (1 << 16) - 1},
                               QuantRange{-(1 << 15), (1 << 16) - 1}}) {
    quant_min = lo;
    quant_max = hi;
    EXPECT_TRUE(raises<c10::ValueError>(call(), "quant_max")) << lo << ", " << hi;
  }
  for (const auto& [lo, hi] : {QuantRange{0, (1 << 16) - 1}, QuantRange{-(1 << 15), (1 << 15) - 1}}) {
    quant_min = lo;
    quant_max = hi;
    EXPECT_NO_THROW(call()()) << lo << ", " << hi;
  }
}

TEST_F(FakeQuantizeErrors, PerChannelQParamsOfWrongShape) {
  scale = at::full({4}, 0.1f);  // one per row, but the channels are on axis 1
  zero_point = at::zeros({8});
  EXPECT_TRUE(raises<c10::ValueError>(call(/*axis=*/1), "scale"));
  scale = at::full({8}, 0.1f);
  zero_point = at::zeros({4});
  EXPECT_TRUE(raises<c10::ValueError>(call(/*axis=*/1), "zero_point"));
  zero_point = at::zeros({8});
  EXPECT_NO_THROW(call(/*axis=*/1)());
}

TEST_F(FakeQuantizeErrors, AxisOutOfRange) {
  scale = at::full({8}, 0.1f);
  zero_point = at::zeros({8});
  EXPECT_TRUE(raises<c10::ValueError>(call(/*axis=*/2), "axis"));
}

TEST_F(FakeQuantizeErrors, GroupSizeNotDividingLastDimension) {
  x = at::randn({4, 10});
  scale = at::full({4, 2}, 0.1f);
  zero_point = at::zeros({4, 2});
  EXPECT_TRUE(raises<c10::ValueError>(call(std::nullopt, /*group_size=*/4), "group_size"));
  EXPECT_NO_THROW(call(std::nullopt, /*group_size=*/5)());
}

TEST_F(FakeQuantizeErrors, InputOfUnsupportedDtype) {
  for (const at::ScalarType bad : {at::kInt, at::kLong, at::kDouble}) {
    x = at::ones({4, 8}, bad);
    EXPECT_TRUE(raises<c10::TypeError>(call(), "input")) << c10::toString(bad);
  }
}

TEST_F(FakeQuantizeErrors, ScaleOfUnsupportedDtype) {
  scale = at::full({1}, 0.1, at::kDouble);
  EXPECT_TRUE(raises<c10::TypeError>(call(), "scale"));
}

TEST_F(FakeQuantizeErrors, BackwardWithGradOutputOfWrongShape) {
  const at::Tensor grad_output = at::ones({4, 7});
  EXPECT_TRUE(raises<c10::ValueError>(
      [&] {
        torchquant::fake_quantize_backward(grad_output, x, scale, zero_point, quant_min,
                                           quant_max);
      },
      "grad_output"));
}

}  // namespace
}  // namespace torchquant::testing
