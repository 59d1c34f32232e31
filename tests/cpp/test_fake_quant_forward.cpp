// Forward of torchquant::fake_quantize through the public C++ API: bit for bit
// the reference and ATen's own fake-quantize ops, for every granularity, the
// three input dtypes and non-contiguous inputs.
#include "fake_quant_cases.h"
#include "fake_quant_reference.h"

#include <gtest/gtest.h>
#include <torchquant/torchquant.h>

namespace torchquant::testing {
namespace {

at::Tensor fake_quantize_case(const at::Tensor& x, const QParams& qp, const FakeQuantCase& c) {
  return torchquant::fake_quantize(x, qp.scale, qp.zero_point, kQuantMin, kQuantMax,
                                   c.granularity.axis, c.granularity.group_size);
}

at::Tensor reference_case(const at::Tensor& x, const QParams& qp, const FakeQuantCase& c) {
  return reference_fake_quantize(x, qp.scale, qp.zero_point, kQuantMin, kQuantMax,
                                 c.granularity);
}

class FakeQuantizeForward : public ::testing::TestWithParam<FakeQuantCase> {
 protected:
  void SetUp() override { at::manual_seed(0); }
};

TEST_P(FakeQuantizeForward, DataIsClippedOnBothSides) {
  const FakeQuantCase& c = GetParam();
  const QParams qp = random_qparams(c);
  const CodeCounts n = count_codes(random_input(c.shape), qp.scale, qp.zero_point, kQuantMin,
                                   kQuantMax, c.granularity);
  EXPECT_GT(n.below, 0);
  EXPECT_GT(n.inside, 0);
  EXPECT_GT(n.above, 0);
}

TEST_P(FakeQuantizeForward, MatchesReferenceForEachInputDtype) {
  const FakeQuantCase& c = GetParam();
  const QParams qp = random_qparams(c);
  for (const at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    SCOPED_TRACE(c10::toString(dtype));
    const at::Tensor x = random_input(c.shape, dtype);
    EXPECT_TRUE(bit_equal(fake_quantize_case(x, qp, c), reference_case(x, qp, c)));
  }
}

TEST_P(FakeQuantizeForward, NonContiguousInputMatchesReference) {
  const FakeQuantCase& c = GetParam();
  const QParams qp = random_qparams(c);
  const int64_t dims = static_cast<int64_t>(c.shape.size());

  // Every other element of a tensor twice as long in the last dimension.
  std::vector<int64_t> doubled = c.shape;
  doubled.back() *= 2;
  const at::Tensor strided = random_input(doubled).slice(-1, 0, doubled.back(), 2);
  // The same shape stored with its dimensions reversed.
  std::vector<int64_t> reversed(c.shape.rbegin(), c.shape.rend());
  std::vector<int64_t> reverse_dims;
  for (int64_t d = dims - 1; d >= 0; --d) reverse_dims.push_back(d);
  const at::Tensor permuted = random_input(reversed).permute(reverse_dims);

  for (const at::Tensor& x : {strided, permuted}) {
    ASSERT_FALSE(x.is_contiguous());
    ASSERT_EQ(x.sizes(), at::IntArrayRef(c.shape));
    EXPECT_TRUE(bit_equal(fake_quantize_case(x, qp, c), reference_case(x, qp, c)));
  }
}

INSTANTIATE_TEST_SUITE_P(Granularities, FakeQuantizeForward,
                         ::testing::ValuesIn(granularity_cases()), case_name);

// ATen's fake-quantize ops use the same float arithmetic (multiply by the
// float reciprocal of the scale, round half to even), so results must agree
// exactly over the usual 8-bit ranges as well as a 4-bit one.
struct Range {
  int64_t quant_min;
  int64_t quant_max;
  int64_t zero_point;
};
const Range kRanges[] = {{-128, 127, 3}, {0, 255, 128}, {-8, 7, -1}};

TEST(FakeQuantizeForwardAten, PerTensorMatchesAten) {
  at::manual_seed(0);
  const at::Tensor x = random_input({7, 45});
  const float scale = 0.0173f;
  for (const Range& r : kRanges) {
    SCOPED_TRACE(::testing::Message() << "[" << r.quant_min << ", " << r.quant_max << "]");
    const at::Tensor expected = at::fake_quantize_per_tensor_affine(
        x, static_cast<double>(scale), r.zero_point, r.quant_min, r.quant_max);
    const at::Tensor actual =
        torchquant::fake_quantize(x, at::full({1}, scale), at::full({1}, r.zero_point, at::kLong),
                                  r.quant_min, r.quant_max);
    EXPECT_TRUE(bit_equal(actual, expected));
  }
}

TEST(FakeQuantizeForwardAten, PerChannelMatchesAten) {
  at::manual_seed(0);
  const at::Tensor x = random_input({6, 5, 41});
  for (const Range& r : kRanges) {
    for (int64_t axis = 0; axis < x.dim(); ++axis) {
      SCOPED_TRACE(::testing::Message()
                   << "[" << r.quant_min << ", " << r.quant_max << "] axis " << axis);
      const int64_t channels = x.size(axis);
      const at::Tensor scale = at::rand({channels}) * 0.03 + 0.005;
      const at::Tensor zero_point = at::randint(-3, 4, {channels}, at::kInt) + r.zero_point;
      const at::Tensor expected = at::fake_quantize_per_channel_affine(
          x, scale, zero_point, axis, r.quant_min, r.quant_max);
      const at::Tensor actual =
          torchquant::fake_quantize(x, scale, zero_point, r.quant_min, r.quant_max, axis);
      EXPECT_TRUE(bit_equal(actual, expected));
    }
  }
}

TEST(FakeQuantizeForwardZeroPoint, FloatZeroPointIsRoundedHalfToEven) {
  at::manual_seed(0);
  const at::Tensor x = random_input({64});
  const at::Tensor scale = at::full({1}, 0.1f);
  auto fq = [&](const at::Tensor& zp) { return torchquant::fake_quantize(x, scale, zp, -8, 7); };
  const auto int_zp = [](int64_t v) { return at::full({1}, v, at::kInt); };

  // The data must tell neighbouring zero-points apart for the checks below
  // to mean anything.
  ASSERT_FALSE(at::equal(fq(int_zp(2)), fq(int_zp(3))));
  EXPECT_TRUE(bit_equal(fq(at::full({1}, 2.5f)), fq(int_zp(2))));
  EXPECT_TRUE(bit_equal(fq(at::full({1}, -3.5f)), fq(int_zp(-4))));
  EXPECT_TRUE(bit_equal(fq(at::full({1}, 2.6f)), fq(at::full({1}, int64_t{3}, at::kLong))));
}

}  // namespace
}  // namespace torchquant::testing
