// The public C++ entry points of the AWQ searches: results against small ATen
// references written from the definitions, and bad arguments raising
// c10::ValueError / c10::TypeError that name the argument. (The Python suite
// compares the ops against a full AutoAWQ-style reference.)
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <torchquant/torchquant.h>

#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

namespace torchquant::testing {
namespace {

constexpr int64_t kIn = 64;
constexpr int64_t kGroup = 16;

template <typename Error, typename Call>
::testing::AssertionResult raises(const Call& call, const std::string& argument) {
  try {
    call();
  } catch (const Error& e) {
    if (e.msg().find(argument) != std::string::npos) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "message does not name '" << argument << "': " << e.msg();
  } catch (const c10::Error& e) {
    return ::testing::AssertionFailure() << "wrong exception type: " << e.msg();
  }
  return ::testing::AssertionFailure() << "no exception";
}

// Inputs with a few loud channels, the situation AWQ is for.
at::Tensor activations(int64_t rows) {
  at::manual_seed(0);
  at::Tensor magnitude = at::rand({kIn}) * 2 + 0.1;
  magnitude.slice(0, 0, 3).mul_(20);
  return at::randn({rows, kIn}) * magnitude;
}

std::vector<at::Tensor> weights() {
  at::manual_seed(1);
  return {at::randn({32, kIn}) * 0.05, at::randn({16, kIn}) * 0.05};
}

// Unsigned 4-bit min/max grid per group, as torchquant's observers build it.
at::Tensor round_to_nearest(const at::Tensor& w) {
  const at::Tensor groups = w.view({w.size(0), -1, kGroup});
  const at::Tensor lo = std::get<0>(groups.min(-1)).clamp_max(0);
  const at::Tensor hi = std::get<0>(groups.max(-1)).clamp_min(0);
  const at::Tensor scale = ((hi - lo) / 15).clamp_min(1.1920928955078125e-07);
  const at::Tensor zero = (-at::round(lo / scale)).clamp(0, 15);
  return torchquant::fake_quantize(w, scale, zero, 0, 15, std::nullopt, kGroup);
}

double output_error(const at::Tensor& x, const at::Tensor& w, const at::Tensor& wq) {
  const at::Tensor diff = at::mm(x.to(at::kDouble), (wq - w).to(at::kDouble).t());
  return diff.pow(2).mean().item<double>();
}

TEST(AwqSearchScales, AlphaZeroIsRoundToNearest) {
  const at::Tensor x = activations(40);
  const auto w = weights();
  const auto [scales, losses] = torchquant::awq_search_scales(x, w, std::nullopt, 0, 15, false, kGroup, 1);
  EXPECT_TRUE(at::equal(scales, at::ones({kIn})));
  ASSERT_EQ(losses.sizes(), at::IntArrayRef({1}));
  double rtn = 0;
  for (const auto& wk : w) rtn += output_error(x, wk, round_to_nearest(wk));
  EXPECT_NEAR(losses.item<double>(), rtn, 1e-5 * rtn);
}

TEST(AwqSearchScales, ReturnsTheBestCandidate) {
  for (const int64_t rows : {40, 200}) {  // fewer and more rows than input features
    const at::Tensor x = activations(rows);
    const auto w = weights();
    const auto [scales, losses] = torchquant::awq_search_scales(x, w, std::nullopt, 0, 15, false, kGroup);
    ASSERT_EQ(losses.sizes(), at::IntArrayRef({20}));
    ASSERT_EQ(scales.sizes(), at::IntArrayRef({kIn}));
    const int64_t best = losses.argmin().item<int64_t>();
    EXPECT_GT(best, 0) << "the loud channels should make some alpha > 0 beat round-to-nearest";
    EXPECT_LE(losses[best].item<float>(), losses[0].item<float>());
    // The scales are the chosen grid point's: mean|x|^alpha, normalised.
    at::Tensor s = x.abs().mean(0).pow(static_cast<double>(best) / 20).clamp_min(1e-4);
    s = s / (s.max() * s.min()).sqrt();
    EXPECT_TRUE(at::allclose(scales, s, 1e-6, 0)) << "rows " << rows;
    // Its loss is the output error of the scaled, quantized weights.
    double loss = 0;
    for (const auto& wk : w) loss += output_error(x, wk, round_to_nearest(wk * scales) / scales);
    EXPECT_NEAR(losses[best].item<double>(), loss, 1e-5 * loss) << "rows " << rows;
  }
}

TEST(AwqSearchScales, BiasesCancel) {
  const at::Tensor x = activations(40);
  const auto w = weights();
  const std::vector<at::Tensor> b = {at::randn({32}), at::randn({16})};
  const auto with_bias = torchquant::awq_search_scales(x, w, b, -8, 7, true, kGroup, 8, true);
  const auto without = torchquant::awq_search_scales(x, w, std::nullopt, -8, 7, true, kGroup, 8, true);
  EXPECT_TRUE(at::equal(std::get<0>(with_bias), std::get<0>(without)));
  EXPECT_TRUE(at::equal(std::get<1>(with_bias), std::get<1>(without)));
}

TEST(AwqSearchClip, PicksACandidateNoWorseThanNoClipping) {
  const at::Tensor x = activations(100);
  at::Tensor w = weights()[0];
  w.index_put_({0, 0}, 1.0);  // an outlier that is worth clipping
  const auto [min_val, max_val] = torchquant::awq_search_clip(x, w, -8, 7, true, kGroup, 20, 0.5);
  ASSERT_EQ(max_val.sizes(), at::IntArrayRef({32, kIn / kGroup}));
  EXPECT_TRUE(at::equal(min_val, -max_val));
  const at::Tensor amax = std::get<0>(w.abs().view({32, -1, kGroup}).max(-1));
  bool clipped = false;
  for (int64_t o = 0; o < 32; ++o) {
    for (int64_t g = 0; g < kIn / kGroup; ++g) {
      const float m = amax[o][g].item<float>();
      const float chosen = max_val[o][g].item<float>();
      bool candidate = false;
      for (int64_t k = 0; k < 20; ++k) {
        candidate |= chosen == m * (1.0f - static_cast<float>(k) * 0.5f / 20.0f);
      }
      EXPECT_TRUE(candidate) << "group (" << o << ", " << g << ")";
      clipped |= chosen < m;
    }
  }
  EXPECT_TRUE(clipped);
  // The layer's output error never grows: each group's did not.
  const auto sym_rtn = [&](const at::Tensor& wc, const at::Tensor& bound) {
    const at::Tensor scale = (bound / 7.5).clamp_min(1.1920928955078125e-07);
    return torchquant::fake_quantize(wc, scale, at::zeros_like(scale), -8, 7, std::nullopt, kGroup);
  };
  const at::Tensor hi = max_val.repeat_interleave(kGroup, 1);
  const at::Tensor clipped_w = at::minimum(at::maximum(w, -hi), hi);
  EXPECT_LE(output_error(x, w, sym_rtn(clipped_w, max_val)), output_error(x, w, sym_rtn(w, amax)));
}

TEST(AwqSearchClip, AsymmetricRangesShrinkBothEnds) {
  const at::Tensor x = activations(100);
  const at::Tensor w = weights()[1];
  const auto [min_val, max_val] = torchquant::awq_search_clip(x, w, 0, 15, false, -1, 10, 0.5, 32, 5);
  ASSERT_EQ(min_val.sizes(), at::IntArrayRef({16, 1}));
  const at::Tensor lo = std::get<0>(w.min(1, true));
  const at::Tensor hi = std::get<0>(w.max(1, true));
  const at::Tensor f = max_val / hi;
  EXPECT_TRUE(at::allclose(min_val / lo, f, 1e-6, 0)) << "both ends share the shrink factor";
  EXPECT_TRUE((f <= 1).all().item<bool>() && (f > 0.5).all().item<bool>());
}

TEST(AwqErrors, ScaleSearchArguments) {
  const at::Tensor x = activations(8);
  const auto w = weights();
  const auto call = [&](auto&& change) {
    return [&, change] {
      at::Tensor xx = x;
      std::vector<at::Tensor> ww = w;
      int64_t grid = 20, group = kGroup;
      change(xx, ww, grid, group);
      torchquant::awq_search_scales(xx, ww, std::nullopt, 0, 15, false, group, grid);
    };
  };
  using T = at::Tensor;
  using W = std::vector<at::Tensor>;
  EXPECT_TRUE(raises<c10::ValueError>(call([](T&, W&, int64_t& g, int64_t&) { g = 0; }), "grid"));
  EXPECT_TRUE(raises<c10::ValueError>(call([](T&, W&, int64_t&, int64_t& gs) { gs = 24; }), "group_size"));
  EXPECT_TRUE(raises<c10::ValueError>(call([](T&, W& ww, int64_t&, int64_t&) { ww[1] = at::randn({16, 32}); }),
                                      "weights[1]"));
  EXPECT_TRUE(raises<c10::ValueError>(call([](T&, W& ww, int64_t&, int64_t&) { ww.clear(); }), "weights"));
  EXPECT_TRUE(raises<c10::ValueError>(call([](T& xx, W&, int64_t&, int64_t&) {
                                        xx = xx.clone();
                                        xx.index_put_({0, 0}, NAN);
                                      }),
                                      "x contains NaN"));
  EXPECT_TRUE(raises<c10::TypeError>(call([](T& xx, W&, int64_t&, int64_t&) { xx = xx.to(at::kInt); }), "x"));
  EXPECT_TRUE(raises<c10::ValueError>(
      [&] { torchquant::awq_search_scales(x, w, std::vector<at::Tensor>{at::randn({32})}, 0, 15, false, kGroup); },
      "biases"));
}

TEST(AwqErrors, ClipSearchArguments) {
  const at::Tensor x = activations(8);
  const at::Tensor w = weights()[0];
  for (const double bad : {0.0, 1.0, -0.5, 2.0}) {
    EXPECT_TRUE(raises<c10::ValueError>(
        [&] { torchquant::awq_search_clip(x, w, 0, 15, false, kGroup, 20, bad); }, "max_shrink"))
        << bad;
  }
  EXPECT_TRUE(raises<c10::ValueError>([&] { torchquant::awq_search_clip(x, w, 0, 15, false, kGroup, 0); },
                                      "steps"));
  EXPECT_TRUE(raises<c10::ValueError>(
      [&] { torchquant::awq_search_clip(x, w, 0, 15, false, kGroup, 20, 0.5, 0); }, "max_tokens"));
  EXPECT_TRUE(raises<c10::ValueError>(
      [&] { torchquant::awq_search_clip(x, w, 0, 15, false, kGroup, 20, 0.5, 512, 0); }, "out_chunk"));
  EXPECT_TRUE(raises<c10::ValueError>(
      [&] { torchquant::awq_search_clip(x, w.slice(1, 0, 32), 0, 15, false, kGroup); }, "weight"));
  EXPECT_TRUE(raises<c10::ValueError>([&] { torchquant::awq_search_clip(x, w, 0, 15, true, kGroup); },
                                      "symmetric"));
}

}  // namespace
}  // namespace torchquant::testing
