// Backward of torchquant::fake_quantize through C++ autograd: the
// straight-through gradient of the input when the quantization parameters are
// fixed, and the LSQ / LSQ+ gradients of scale and zero-point (scaled by
// grad_factor) when they are learned, for every granularity and input dtype.
#include "fake_quant_cases.h"
#include "fake_quant_reference.h"

#include <gtest/gtest.h>
#include <torchquant/torchquant.h>

#include <tuple>

namespace torchquant::testing {
namespace {

// Sums of a few hundred float terms, accumulated in a different order than
// the reference's double sum.
constexpr double kSumRtol = 1e-4;
constexpr double kSumAtol = 1e-3;

using AutogradParam = std::tuple<FakeQuantCase, at::ScalarType>;

class FakeQuantizeAutograd : public ::testing::TestWithParam<AutogradParam> {
 protected:
  void SetUp() override { at::manual_seed(0); }
  const FakeQuantCase& fq_case() const { return std::get<0>(GetParam()); }
  at::ScalarType dtype() const { return std::get<1>(GetParam()); }

  // Runs fake_quantize forward and backward with `grad_output` and returns
  // the reference gradients for the same data.
  ReferenceGrads run_backward(const at::Tensor& x, const QParams& qp,
                              const at::Tensor& grad_output, double grad_factor) const {
    const Granularity& g = fq_case().granularity;
    const at::Tensor y = torchquant::fake_quantize(x, qp.scale, qp.zero_point, kQuantMin,
                                                   kQuantMax, g.axis, g.group_size, grad_factor);
    y.backward(grad_output);
    return reference_grads(grad_output, x.detach(), qp.scale.detach(), qp.zero_point.detach(),
                           kQuantMin, kQuantMax, g, grad_factor);
  }
};

TEST_P(FakeQuantizeAutograd, FixedQParamsGiveStraightThroughInputGradient) {
  const at::Tensor x = random_input(fq_case().shape, dtype()).requires_grad_();
  const QParams qp = random_qparams(fq_case());
  const at::Tensor dy = at::randn(fq_case().shape).to(dtype());

  const ReferenceGrads expected = run_backward(x, qp, dy, /*grad_factor=*/1.0);

  EXPECT_TRUE(bit_equal(x.grad(), expected.input));
  EXPECT_FALSE(qp.scale.grad().defined());
  EXPECT_FALSE(qp.zero_point.grad().defined());
}

TEST_P(FakeQuantizeAutograd, LearnableQParamsGetScaledLsqGradients) {
  const at::Tensor x = random_input(fq_case().shape, dtype()).requires_grad_();
  QParams qp = random_qparams(fq_case());
  qp.scale.requires_grad_();
  qp.zero_point.requires_grad_();
  const at::Tensor dy = at::randn(fq_case().shape).to(dtype());
  const double grad_factor = 0.37;

  const ReferenceGrads expected = run_backward(x, qp, dy, grad_factor);

  EXPECT_TRUE(bit_equal(x.grad(), expected.input));
  ASSERT_TRUE(qp.scale.grad().defined());
  ASSERT_TRUE(qp.zero_point.grad().defined());
  EXPECT_TRUE(all_close(qp.scale.grad(), expected.scale, kSumRtol, kSumAtol));
  EXPECT_TRUE(all_close(qp.zero_point.grad(), expected.zero_point, kSumRtol, kSumAtol));
}

TEST_P(FakeQuantizeAutograd, OnlyScaleLearnedLeavesZeroPointWithoutGradient) {
  const at::Tensor x = random_input(fq_case().shape, dtype());
  QParams qp = random_qparams(fq_case());
  qp.scale.requires_grad_();
  const at::Tensor dy = at::randn(fq_case().shape).to(dtype());

  const ReferenceGrads expected = run_backward(x, qp, dy, /*grad_factor=*/2.0);

  EXPECT_TRUE(all_close(qp.scale.grad(), expected.scale, kSumRtol, kSumAtol));
  EXPECT_FALSE(qp.zero_point.grad().defined());
  EXPECT_FALSE(x.grad().defined());
}

std::string autograd_name(const ::testing::TestParamInfo<AutogradParam>& info) {
  return std::get<0>(info.param).granularity.name + "_" +
         c10::toString(std::get<1>(info.param));
}

INSTANTIATE_TEST_SUITE_P(
    GranularitiesAndDtypes, FakeQuantizeAutograd,
    ::testing::Combine(::testing::ValuesIn(granularity_cases()),
                       ::testing::Values(at::kFloat, at::kHalf, at::kBFloat16)),
    autograd_name);

}  // namespace
}  // namespace torchquant::testing
