// The lookup-table ops (NF4 codes, block absmax) and LLM.int8()'s outlier
// decomposition through the public C++ API, against formulas written here
// with ATen, and the errors raised for bad arguments.
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <torchquant/torchquant.h>

#include <ATen/ATen.h>

#include <limits>
#include <optional>
#include <string>
#include <tuple>

namespace torchquant::testing {
namespace {

template <typename Error, typename Call>
::testing::AssertionResult raises(const Call& call, const std::string& needle) {
  try {
    call();
  } catch (const Error& e) {
    if (e.msg().find(needle) != std::string::npos) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "message does not mention '" << needle << "': " << e.msg();
  } catch (const c10::Error& e) {
    return ::testing::AssertionFailure() << "wrong exception type: " << e.msg();
  }
  return ::testing::AssertionFailure() << "no exception";
}

// The 16 NF4 levels (QLoRA), ascending.
at::Tensor nf4_levels() {
  return at::tensor({-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                     -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                     0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,
                     0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
                     0.7229568362236023f, 1.0f});
}

TEST(RuntimeLut, CodesAreTheNearestLevelOfEachBlock) {
  at::manual_seed(0);
  const at::Tensor lut = nf4_levels();
  const at::Tensor x = at::randn({6, 128});
  auto [codes, absmax] = torchquant::lut_quantize(x, lut, 64);
  ASSERT_EQ(codes.scalar_type(), at::kByte);
  const at::Tensor blocks = x.reshape({-1, 64});
  EXPECT_TRUE(at::equal(absmax, std::get<0>(blocks.abs().max(1))));
  // Nearest level by brute force (no ties in random data).
  const at::Tensor scaled = (blocks * (1.0 / absmax).unsqueeze(1)).reshape({-1, 1});
  const at::Tensor nearest = std::get<1>((scaled - lut.unsqueeze(0)).abs().min(1));
  EXPECT_TRUE(at::equal(codes.reshape({-1}).to(at::kLong), nearest));
  const at::Tensor back = torchquant::lut_dequantize(codes, absmax, lut, 64);
  EXPECT_TRUE(at::equal(back.reshape({-1, 64}), lut.index({codes.reshape({-1}).to(at::kLong)})
                                                     .reshape({-1, 64}) * absmax.unsqueeze(1)));
}

TEST(RuntimeLut, BadArgumentsRaise) {
  const at::Tensor lut = nf4_levels();
  at::Tensor nan_x = at::ones({4});
  nan_x.index_put_({1}, std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE(raises<c10::ValueError>([&] { torchquant::lut_quantize(nan_x, lut, 2); }, "finite"));
  EXPECT_TRUE(raises<c10::ValueError>([&] { torchquant::lut_quantize(at::ones({4}), lut, 0); }, "block_size"));
  EXPECT_TRUE(raises<c10::TypeError>([&] { torchquant::lut_quantize(at::ones({4}), lut.to(at::kDouble), 2); }, "lut"));
  const at::Tensor codes = at::full({4}, 16, at::kByte);
  EXPECT_TRUE(raises<c10::ValueError>([&] { torchquant::lut_dequantize(codes, at::ones({2}), lut, 2); }, "levels"));
  EXPECT_TRUE(raises<c10::ValueError>([&] { torchquant::lut_dequantize(codes, at::ones({3}), lut, 2); }, "absmax"));
}

TEST(RuntimeLlmInt8, OutlierColumnsGoThroughFloat) {
  at::manual_seed(1);
  const int64_t n = 24, k = 96;
  const at::Tensor q = at::randint(-127, 128, {n, k}, at::kLong);
  at::Tensor packed = at::zeros({n, k}, at::kByte);
  packed.copy_(q + 128);
  const at::Tensor scales = at::rand({n, 1}) * 0.01 + 1e-3;
  at::Tensor x = at::randn({5, k});
  x.index_put_({2, 7}, 30.0f);  // column 7 becomes an outlier column
  const at::Tensor y = torchquant::w8a8_linear(x, packed, scales, std::nullopt, std::nullopt, 6.0);
  // Reference: per-token grids over the values below 6, column 7 in float.
  at::Tensor inliers = x.clone();
  inliers.index_put_({2, 7}, 0.0f);
  const at::Tensor s_x = (inliers.abs().amax(1, true) / 127.5).clamp_min(std::numeric_limits<float>::epsilon());
  at::Tensor codes = at::round(x * at::reciprocal(s_x)).clamp(-128, 127);
  codes.select(1, 7).zero_();
  at::Tensor want = at::matmul(codes.to(at::kDouble), q.to(at::kDouble).t()).to(at::kFloat) * s_x * scales.t();
  const at::Tensor w7 = q.select(1, 7).to(at::kFloat) * scales.squeeze(1);
  want = want + x.select(1, 7).unsqueeze(1) * w7.unsqueeze(0);
  EXPECT_TRUE(at::allclose(y, want, 1e-5, 1e-4));
  // Below the threshold everywhere: plain W8A8.
  const at::Tensor calm = at::randn({5, k}).clamp(-5.0, 5.0);
  EXPECT_TRUE(at::equal(torchquant::w8a8_linear(calm, packed, scales, std::nullopt, std::nullopt, 6.0),
                        torchquant::w8a8_linear(calm, packed, scales)));
  EXPECT_TRUE(raises<c10::ValueError>(
      [&] { torchquant::w8a8_linear(x, packed, scales, at::ones({1}), std::nullopt, 6.0); }, "per-token"));
  EXPECT_TRUE(raises<c10::ValueError>(
      [&] { torchquant::w8a8_linear(x, packed, scales, std::nullopt, std::nullopt, -1.0); }, "outlier_threshold"));
}

}  // namespace
}  // namespace torchquant::testing
