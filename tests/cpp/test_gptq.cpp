// The GPTQ ops through the public C++ API: the Hessian against X^T X, a
// two-column case worked out by hand (the error of the first column moves the
// second across a rounding boundary), GPTQ beating round-to-nearest on
// correlated inputs, the outputs reproducing each other, and the errors.
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <torchquant/torchquant.h>

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <string>

namespace torchquant::testing {
namespace {

double quadratic_loss(const at::Tensor& w, const at::Tensor& q, const at::Tensor& h) {
  const at::Tensor e = (w - q).to(at::kDouble);
  return 0.5 * at::mul(at::mm(e, h.to(at::kDouble)), e).sum().item<double>();
}

// Inputs driven by a few latent factors: a strongly correlated Hessian.
at::Tensor correlated_hessian(int64_t features, int64_t samples) {
  const at::Tensor x = at::mm(at::randn({samples, features / 8}), at::randn({features / 8, features})) +
                       0.01 * at::randn({samples, features});
  at::Tensor h = at::zeros({features, features});
  torchquant::gptq_accumulate_hessian(h, x, 0);
  return h;
}

TEST(GptqHessian, AccumulatesTheAverageOfTwoXXt) {
  at::manual_seed(0);
  const at::Tensor a = at::randn({7, 12});
  const at::Tensor b = at::randn({2, 5, 12}).to(at::kHalf);
  at::Tensor h = at::zeros({12, 12});
  int64_t seen = torchquant::gptq_accumulate_hessian(h, a, 0);
  EXPECT_EQ(seen, 7);
  seen = torchquant::gptq_accumulate_hessian(h, b, seen);
  EXPECT_EQ(seen, 17);
  const at::Tensor x = at::cat({a.to(at::kDouble), b.reshape({10, 12}).to(at::kDouble)});
  const at::Tensor expected = 2.0 * at::mm(x.t(), x) / 17.0;
  EXPECT_TRUE(at::allclose(h.to(at::kDouble), expected, 1e-5, 1e-6));
}

// One row, two columns, H = [[1, 0.5], [0.5, 1]] (damping 0.01: the mean
// diagonal times percdamp), signed 4 bits, one grid for the row:
// scale = max|w| / 7.5 = 0.1.
//   column 0: 0.52 -> code 5 (0.5), error 0.02;
//   column 1: -0.75 + 0.02 * 0.5 / 1.01 = -0.7401 -> code -7 (-0.7),
// where rounding to nearest would give -7.5 -> -8 (-0.8). Loss with the
// undamped H: E = [0.02, -0.05], E H E^T / 2 = 0.00095 (RTN: 0.00195).
TEST(GptqQuantize, ErrorFeedbackByHand) {
  const at::Tensor w = at::tensor({0.52f, -0.75f}).view({1, 2});
  const at::Tensor h = at::tensor({1.0f, 0.5f, 0.5f, 1.0f}).view({2, 2});
  const GPTQResult r = torchquant::gptq_quantize(w, h, -8, 7, /*symmetric=*/true);
  EXPECT_EQ(r.codes[0][0].item<int>(), 5);
  EXPECT_EQ(r.codes[0][1].item<int>(), -7);
  EXPECT_NEAR(r.scales.item<float>(), 0.1f, 1e-7);
  EXPECT_EQ(r.zero_points.item<float>(), 0.0f);
  EXPECT_NEAR(r.weight_q[0][0].item<float>(), 0.5f, 1e-6);
  EXPECT_NEAR(r.weight_q[0][1].item<float>(), -0.7f, 1e-6);
  EXPECT_NEAR(r.loss.item<float>(), 0.00095f, 1e-7);
  EXPECT_NEAR(r.damp.item<float>(), 0.01f, 1e-8);
  EXPECT_EQ(r.g_idx[0].item<int>(), 0);
  EXPECT_EQ(r.g_idx[1].item<int>(), 0);
}

TEST(GptqQuantize, BeatsRoundToNearestOnCorrelatedInputs) {
  at::manual_seed(1);
  const int64_t rows = 16, cols = 128;
  const at::Tensor h = correlated_hessian(cols, 512);
  const at::Tensor w = at::randn({rows, cols});
  GPTQOptions options;
  options.act_order = true;
  const GPTQResult r = torchquant::gptq_quantize(w, h, -8, 7, true, options);
  // Round to nearest on the same per-row grids.
  const at::Tensor scale = w.abs().amax(1) / 7.5;
  const at::Tensor rtn = torchquant::fake_quantize(w, scale, at::zeros({rows}), -8, 7, /*axis=*/0);
  const double rtn_loss = quadratic_loss(w, rtn, h);
  EXPECT_LT(r.loss.item<double>(), 0.5 * rtn_loss);
  EXPECT_NEAR(r.loss.item<double>(), quadratic_loss(w, r.weight_q, h), 1e-4 * rtn_loss);
}

TEST(GptqQuantize, CodesAndGridsReproduceTheWeights) {
  at::manual_seed(2);
  const at::Tensor h = correlated_hessian(64, 256);
  const at::Tensor w = at::randn({8, 64});
  GPTQOptions options;
  options.group_size = 16;
  options.act_order = true;
  options.block_size = 24;
  const GPTQResult r = torchquant::gptq_quantize(w, h, 0, 15, /*symmetric=*/false, options);
  ASSERT_EQ(r.scales.sizes(), at::IntArrayRef({8, 4}));
  const at::Tensor idx = r.g_idx.to(at::kLong);
  const at::Tensor dequantized = (r.codes.to(at::kFloat) - r.zero_points.index_select(1, idx)) *
                                 r.scales.index_select(1, idx);
  EXPECT_TRUE(at::equal(dequantized, r.weight_q));
  EXPECT_GE(r.codes.min().item<int>(), 0);
  EXPECT_LE(r.codes.max().item<int>(), 15);
  // Every group has 16 columns.
  EXPECT_TRUE(at::equal(at::bincount(idx), at::full({4}, 16, at::kLong)));
}

// Success when `call` throws exactly `Error` and its message mentions `text`.
template <typename Error, typename Call>
::testing::AssertionResult raises(const Call& call, const std::string& text) {
  try {
    call();
  } catch (const Error& e) {
    if (e.msg().find(text) != std::string::npos) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "message does not mention '" << text << "': " << e.msg();
  } catch (const c10::Error& e) {
    return ::testing::AssertionFailure() << "wrong exception type: " << e.msg();
  }
  return ::testing::AssertionFailure() << "no exception";
}

class GptqErrors : public ::testing::Test {
 protected:
  at::Tensor w = at::randn({4, 32});
  at::Tensor h = at::eye(32);
  GPTQOptions options;

  auto call() {
    return [this] { torchquant::gptq_quantize(w, h, -8, 7, true, options); };
  }
};

TEST_F(GptqErrors, ValidArgumentsAreAccepted) { EXPECT_NO_THROW(call()()); }

TEST_F(GptqErrors, WeightNot2D) {
  w = at::randn({32});
  EXPECT_TRUE(raises<c10::ValueError>(call(), "weight must be 2-D"));
}

TEST_F(GptqErrors, WeightDtype) {
  w = w.to(at::kDouble);
  EXPECT_TRUE(raises<c10::TypeError>(call(), "weight must be float32, float16 or bfloat16"));
}

TEST_F(GptqErrors, HessianShape) {
  h = at::eye(31);
  EXPECT_TRUE(raises<c10::ValueError>(call(), "hessian must be [in_features, in_features] = [32, 32]"));
}

TEST_F(GptqErrors, HessianNotFinite) {
  h[3][4] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(raises<c10::ValueError>(call(), "hessian contains NaN or Inf"));
}

TEST_F(GptqErrors, GroupSizeNotDividing) {
  options.group_size = 10;
  EXPECT_TRUE(raises<c10::ValueError>(call(), "group_size (10) must divide in_features"));
}

TEST_F(GptqErrors, Percdamp) {
  options.percdamp = 0.0;
  EXPECT_TRUE(raises<c10::ValueError>(call(), "percdamp must be in (0, 1]"));
}

TEST_F(GptqErrors, BlockSize) {
  options.block_size = 0;
  EXPECT_TRUE(raises<c10::ValueError>(call(), "block_size must be positive"));
}

// The identity with two columns coupled by 3: eigenvalue -2, which no damping
// up to the mean diagonal (1) repairs.
TEST_F(GptqErrors, NotPositiveDefiniteNamesTheLayer) {
  h[0][1] = 3.0f;
  h[1][0] = 3.0f;
  options.layer_name = "blocks.2.mlp.up_proj";
  EXPECT_TRUE(raises<c10::LinAlgError>(call(), "(layer 'blocks.2.mlp.up_proj')"));
  EXPECT_TRUE(raises<c10::LinAlgError>(call(), "rtn_fallback=True"));
  options.rtn_fallback = true;
  const GPTQResult r = torchquant::gptq_quantize(w, h, -8, 7, true, options);
  EXPECT_EQ(r.damp.item<float>(), -1.0f);
  const at::Tensor scale = w.abs().amax(1) / 7.5;
  EXPECT_TRUE(at::equal(r.weight_q, torchquant::fake_quantize(w, scale, at::zeros({4}), -8, 7, 0)));
}

TEST(GptqHessianErrors, NanInputs) {
  at::Tensor h = at::zeros({4, 4});
  at::Tensor x = at::randn({3, 4});
  x[2][1] = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(raises<c10::ValueError>([&] { torchquant::gptq_accumulate_hessian(h, x, 0); },
                                      "inputs contain NaN or Inf"));
  EXPECT_TRUE(raises<c10::ValueError>(
      [&] { torchquant::gptq_accumulate_hessian(h, at::randn({3, 5}), 0); },
      "inputs must have shape [..., in_features] with in_features = 4"));
}

}  // namespace
}  // namespace torchquant::testing
