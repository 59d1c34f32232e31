// The SmoothQuant entry points of the public C++ API: smoothing factors
// against the paper's formula (written here with ATen in float64), folding
// that leaves a float64 model's outputs unchanged, per-token quantization bit
// for bit against a reference, and the errors raised for bad arguments.
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <torchquant/torchquant.h>

#include <ATen/ATen.h>

#include <limits>
#include <string>
#include <vector>

namespace torchquant::testing {
namespace {

template <typename Error, typename Call>
::testing::AssertionResult raises(const Call& call, const std::string& needle) {
  try {
    call();
  } catch (const Error& e) {
    if (e.msg().find(needle) != std::string::npos) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure()
           << "message does not mention '" << needle << "': " << e.msg();
  } catch (const c10::Error& e) {
    return ::testing::AssertionFailure() << "wrong exception type: " << e.msg();
  }
  return ::testing::AssertionFailure() << "no exception";
}

// Positive per-channel maxima over a few decades, two of them outliers.
at::Tensor act_absmax(int64_t n, at::ScalarType dtype = at::kFloat) {
  at::Tensor act = at::exp(at::linspace(-3.0, 1.0, n, at::kDouble));
  act.index_put_({0}, act[0] * 60.0);
  act.index_put_({n / 2}, act[n / 2] * 60.0);
  return act.to(dtype);
}

// Eq. 4 of the paper in float64, with the reference code's clamps at eps.
at::Tensor reference_scales(const at::Tensor& act, const std::vector<at::Tensor>& weights,
                            double alpha, double eps = 1e-5) {
  std::vector<at::Tensor> rows;
  for (const auto& w : weights) rows.push_back(w.to(at::kDouble).abs());
  const at::Tensor w_max = at::cat(rows, 0).amax(0).clamp_min(eps);
  return (act.to(at::kDouble).pow(alpha) / w_max.pow(1.0 - alpha)).clamp_min(eps);
}

TEST(SmoothQuantScales, MatchPaperFormula) {
  at::manual_seed(0);
  const at::Tensor act = act_absmax(24);
  const std::vector<at::Tensor> weights{at::randn({8, 24}) * 0.05, at::randn({16, 24}) * 0.05};
  for (const double alpha : {0.0, 0.3, 0.5, 0.85, 1.0}) {
    const at::Tensor s = torchquant::smoothquant_scales(act, weights, alpha);
    ASSERT_EQ(s.scalar_type(), at::kFloat);
    EXPECT_TRUE(at::allclose(s.to(at::kDouble), reference_scales(act, weights, alpha), 2e-6, 0.0))
        << "alpha " << alpha;
  }
}

TEST(SmoothQuantScales, Float64StatisticGivesFloat64) {
  at::manual_seed(1);
  const at::Tensor act = act_absmax(10, at::kDouble);
  const std::vector<at::Tensor> weights{at::randn({4, 10}, at::kDouble)};
  const at::Tensor s = torchquant::smoothquant_scales(act, weights, 0.5);
  ASSERT_EQ(s.scalar_type(), at::kDouble);
  EXPECT_TRUE(at::allclose(s, reference_scales(act, weights, 0.5), 1e-13, 0.0));
}

// LayerNorm -> (q, k, v) in float64: folding changes nothing but rounding.
TEST(SmoothQuantFold, KeepsLayerNormQkvOutputs) {
  at::manual_seed(2);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor gamma = at::randn({16}, f64) + 1.0, beta = at::randn({16}, f64);
  std::vector<at::Tensor> qkv{at::randn({16, 16}, f64), at::randn({8, 16}, f64),
                              at::randn({8, 16}, f64)};
  const at::Tensor x = at::randn({5, 16}, f64) * at::linspace(1.0, 40.0, 16, f64);
  auto forward = [&] {
    const at::Tensor h = at::layer_norm(x, {16}, gamma, beta);
    return at::cat({at::linear(h, qkv[0]), at::linear(h, qkv[1]), at::linear(h, qkv[2])}, 1);
  };
  const at::Tensor before = forward();
  const at::Tensor act = at::layer_norm(x, {16}, gamma, beta).abs().amax(0);
  const at::Tensor s = torchquant::smoothquant_scales(act, qkv, 0.5);
  torchquant::smoothquant_fold_(gamma, beta, qkv, s);
  const at::Tensor after = forward();
  const double tol = 1e-13 * before.abs().max().item<double>();
  EXPECT_TRUE(at::allclose(after, before, 0.0, tol));
  EXPECT_FALSE(at::equal(gamma, at::ones_like(gamma)));
}

// Linear -> Linear (with bias): the first layer's rows are divided by s.
TEST(SmoothQuantFold, KeepsLinearLinearOutputs) {
  at::manual_seed(3);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor w1 = at::randn({12, 6}, f64), b1 = at::randn({12}, f64), w2 = at::randn({4, 12}, f64);
  const at::Tensor x = at::randn({7, 6}, f64);
  const at::Tensor before = at::linear(at::linear(x, w1, b1), w2);
  const at::Tensor s = at::exp(at::randn({12}, f64));
  torchquant::smoothquant_fold_(w1, b1, {w2}, s);
  const at::Tensor after = at::linear(at::linear(x, w1, b1), w2);
  EXPECT_TRUE(at::allclose(after, before, 0.0, 1e-13 * before.abs().max().item<double>()));
}

// A float16 tensor is computed in float32 and rounded once.
TEST(SmoothQuantFold, HalfTensorsAreRoundedOnce) {
  at::manual_seed(4);
  const at::Tensor s = at::exp(at::randn({8}));
  at::Tensor prev = at::randn({8}).to(at::kHalf), next = at::randn({3, 8}).to(at::kHalf);
  const at::Tensor prev_expected = (prev.to(at::kFloat) / s).to(at::kHalf);
  const at::Tensor next_expected = (next.to(at::kFloat) * s.unsqueeze(0)).to(at::kHalf);
  torchquant::smoothquant_fold_(prev, std::nullopt, {next}, s);
  EXPECT_TRUE(at::equal(prev, prev_expected));
  EXPECT_TRUE(at::equal(next, next_expected));
}

TEST(SmoothQuantFold, EditsLeavesThatRequireGrad) {
  at::Tensor gamma = at::ones({4}).requires_grad_(), w = at::ones({2, 4}).requires_grad_();
  torchquant::smoothquant_fold_(gamma, std::nullopt, {w}, at::full({4}, 2.0f));
  EXPECT_TRUE(gamma.is_leaf() && gamma.requires_grad());
  EXPECT_TRUE(at::equal(gamma.detach(), at::full({4}, 0.5f)));
  EXPECT_TRUE(at::equal(w.detach(), at::full({2, 4}, 2.0f)));
}

// Symmetric per-row grid: scale = max(absmax / ((qmax - qmin) / 2), eps),
// codes = clamp(round(x * (1 / scale))).
std::pair<at::Tensor, at::Tensor> reference_per_token(const at::Tensor& x, int64_t qmin,
                                                      int64_t qmax) {
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor scale = (xf.abs().amax(-1, true) / (static_cast<double>(qmax - qmin) / 2.0))
                               .clamp_min(std::numeric_limits<float>::epsilon());
  const at::Tensor codes = (xf * at::reciprocal(scale)).round().clamp(qmin, qmax).to(at::kLong);
  return {codes, scale};
}

TEST(QuantizePerToken, MatchesReference) {
  at::manual_seed(5);
  const at::Tensor x = at::randn({3, 4, 32}) * at::exp(at::randn({3, 4, 1}));
  for (const auto& [qmin, qmax] : std::vector<std::pair<int64_t, int64_t>>{
           {-128, 127}, {-127, 127}, {-8, 7}, {-32768, 32767}}) {
    for (const auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
      const at::Tensor xd = x.to(dtype);
      const auto [codes, scales] = torchquant::quantize_per_token(xd, qmin, qmax);
      const auto [want_codes, want_scales] = reference_per_token(xd, qmin, qmax);
      EXPECT_EQ(codes.scalar_type(), qmax <= 127 ? at::kChar : at::kInt);
      EXPECT_EQ(scales.sizes(), at::IntArrayRef({3, 4, 1}));
      EXPECT_TRUE(at::equal(codes.to(at::kLong), want_codes))
          << qmin << ", " << qmax << ", " << dtype;
      EXPECT_TRUE(at::equal(scales, want_scales)) << qmin << ", " << qmax << ", " << dtype;
    }
  }
}

TEST(QuantizePerToken, ZeroRowHasFiniteScaleAndZeroCodes) {
  at::Tensor x = at::randn({3, 8});
  x[1].zero_();
  const auto [codes, scales] = torchquant::quantize_per_token(x);
  EXPECT_EQ(scales[1].item<float>(), std::numeric_limits<float>::epsilon());
  EXPECT_TRUE(at::equal(codes[1], at::zeros({8}, at::kChar)));
  EXPECT_TRUE(at::isfinite(scales).all().item<bool>());
}

// Each call is wrapped so that `raises` can run it.
auto scales_call(at::Tensor act, std::vector<at::Tensor> weights, double alpha) {
  return [=] { torchquant::smoothquant_scales(act, weights, alpha); };
}

auto fold_call(at::Tensor prev, std::vector<at::Tensor> next, at::Tensor s) {
  return [=] { torchquant::smoothquant_fold_(prev, std::nullopt, next, s); };
}

auto per_token_call(at::Tensor x, int64_t quant_min = -128, int64_t quant_max = 127) {
  return [=] { torchquant::quantize_per_token(x, quant_min, quant_max); };
}

TEST(SmoothQuantErrors, ScalesArguments) {
  const at::Tensor act = act_absmax(8);
  const std::vector<at::Tensor> w{at::randn({4, 8}), at::randn({3, 8})};
  EXPECT_TRUE(raises<c10::ValueError>(scales_call(act, w, 1.5), "alpha"));
  EXPECT_TRUE(raises<c10::ValueError>(scales_call(act, w, -0.5), "alpha"));
  at::Tensor dead = act.clone();
  dead[3] = 0.0f;
  EXPECT_TRUE(raises<c10::ValueError>(scales_call(dead, w, 0.5), "1 of its 8 channels are <= 0"));
  at::Tensor nan = act.clone();
  nan[2] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(raises<c10::ValueError>(scales_call(nan, w, 0.5), "NaN or Inf"));
  EXPECT_TRUE(
      raises<c10::ValueError>(scales_call(act.unsqueeze(0), w, 0.5), "act_absmax must be 1-D"));
  EXPECT_TRUE(
      raises<c10::ValueError>(scales_call(act, {w[0], at::randn({3, 9})}, 0.5), "weights[1]"));
  EXPECT_TRUE(raises<c10::ValueError>(scales_call(act, {}, 0.5), "weights"));
  EXPECT_TRUE(raises<c10::TypeError>(scales_call(act.to(at::kInt), w, 0.5), "act_absmax"));
}

TEST(SmoothQuantErrors, FoldArgumentsLeaveTensorsUnchanged) {
  const at::Tensor gamma = at::ones({8}), w = at::randn({4, 8});
  const at::Tensor w_before = w.clone();
  EXPECT_TRUE(raises<c10::ValueError>(fold_call(at::ones({7}), {w}, at::ones({8})), "prev_weight"));
  EXPECT_TRUE(raises<c10::ValueError>(fold_call(gamma, {w, w}, at::ones({8})), "share memory"));
  EXPECT_TRUE(raises<c10::ValueError>(fold_call(gamma, {w}, at::zeros({8})),
                                      "scales must be positive and finite"));
  EXPECT_TRUE(raises<c10::ValueError>(fold_call(gamma, {at::randn({4, 5})}, at::ones({8})),
                                      "next_weights[0]"));
  EXPECT_TRUE(at::equal(w, w_before));
  EXPECT_TRUE(at::equal(gamma, at::ones({8})));
}

TEST(SmoothQuantErrors, PerTokenArguments) {
  const at::Tensor x = at::randn({2, 4});
  EXPECT_TRUE(raises<c10::ValueError>(per_token_call(x, 0, 255), "quant_min"));
  EXPECT_TRUE(raises<c10::TypeError>(per_token_call(x.to(at::kDouble)), "x must be"));
  EXPECT_TRUE(raises<c10::ValueError>(per_token_call(at::ones({})), "x must have"));
  at::Tensor inf = x.clone();
  inf[1][2] = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(raises<c10::ValueError>(per_token_call(inf), "1 of its 2 rows"));
}

}  // namespace
}  // namespace torchquant::testing
