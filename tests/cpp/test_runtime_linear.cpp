// The weight-only run-time ops of the public C++ API, and every CPU kernel
// table (baseline, AVX2, AVX-512, whichever this CPU has) called directly:
// results against W = (v(u) - z) s computed here in float64 from the codes
// (not from the packed bytes), autograd, and the errors of bad arguments.
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <torchquant/torchquant.h>

#include <ATen/ATen.h>
#include <torch/autograd.h>

// Internal header: the per-instruction-set kernel tables.
#include "../../csrc/runtime/cpu/quantized_linear_kernel.h"

#include <string>
#include <vector>

namespace torchquant::testing {
namespace {

struct TestWeight {
  at::Tensor codes, packed, scales, zeros, lut;
  int64_t bits, k;
  std::optional<at::Tensor> lut_opt() const {
    return lut.defined() ? std::optional<at::Tensor>(lut) : std::nullopt;
  }
};

TestWeight make_weight(int64_t n, int64_t k, int64_t groups, int64_t bits, bool lut = false) {
  at::manual_seed(n * 131 + k * 7 + bits);
  TestWeight w;
  w.bits = bits;
  w.k = k;
  w.codes = at::randint(0, int64_t{1} << bits, {n, k}, at::kLong);
  w.packed = torchquant::pack_weight(w.codes, bits);
  w.scales = at::rand({n, groups}) * 0.1 + 0.01;
  w.zeros = lut ? at::rand({n, groups}) * 0.2 - 0.1
                : at::randint(0, int64_t{1} << bits, {n, groups}, at::kFloat) + 0.25;
  if (lut) w.lut = at::linspace(-1.0, 1.0, 16, at::kFloat).pow(3);
  return w;
}

// float64 weight and s (|v| + |z|) (the scale of the rounding of any summation order).
std::pair<at::Tensor, at::Tensor> reference_weight(const TestWeight& w) {
  const int64_t g = w.k / w.scales.size(1);
  const at::Tensor v = w.lut.defined() ? w.lut.to(at::kDouble).index({w.codes})
                                       : w.codes.to(at::kDouble);
  const at::Tensor s = w.scales.to(at::kDouble).repeat_interleave(g, 1);
  const at::Tensor z = w.zeros.to(at::kDouble).repeat_interleave(g, 1);
  return {(v - z) * s, s * (v.abs() + z.abs())};
}

void expect_close(const at::Tensor& actual, const at::Tensor& expected, const at::Tensor& terms,
                  const std::string& what) {
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  const at::Tensor diff = (actual.to(at::kDouble) - expected).abs();
  const double out_rtol = actual.scalar_type() == at::kFloat ? 1e-6 : 1e-2;
  const at::Tensor tol = terms * 3e-5 + expected.abs() * out_rtol + 1e-30;
  EXPECT_FALSE((diff > tol).any().item<bool>())
      << what << ": worst diff " << diff.max().item<double>();
}

void check_table(const QuantLinearKernels& table, const std::string& isa) {
  const std::vector<std::vector<int64_t>> cases = {
      {2, 64, 2}, {3, 100, 1}, {4, 256, 2}, {8, 96, 2}, {4, 120, 3}, {3, 48, 3}};
  for (const auto& c : cases) {
    for (bool lut : {false, true}) {
      if (lut && c[0] != 4) continue;
      const TestWeight w = make_weight(40, c[1], c[2], c[0], lut);
      const auto [W, Wabs] = reference_weight(w);
      for (int64_t m : {1, 5, 9, 40}) {
        const std::string what = isa + " bits=" + std::to_string(c[0]) + " K=" +
                                 std::to_string(c[1]) + " M=" + std::to_string(m);
        const at::Tensor x = at::randn({m, w.k});
        const at::Tensor perm = at::randperm(w.k);
        const at::Tensor bias = at::randn({40});
        const at::Tensor y = quantized_linear_with(table, x, w.packed, w.scales, w.zeros, w.bits,
                                                   w.k, w.lut_opt(), perm, bias);
        const at::Tensor xp = x.to(at::kDouble).index_select(1, perm);
        expect_close(y, at::matmul(xp, W.t()) + bias.to(at::kDouble),
                     at::matmul(xp.abs(), Wabs.t()) + bias.abs().to(at::kDouble), what + " y");
        const at::Tensor dy = at::randn({m, 40});
        const at::Tensor dx = quantized_linear_grad_input_with(table, dy, w.packed, w.scales,
                                                               w.zeros, w.bits, w.k, w.lut_opt(),
                                                               std::nullopt);
        expect_close(dx, at::matmul(dy.to(at::kDouble), W),
                     at::matmul(dy.to(at::kDouble).abs(), Wabs), what + " dx");
      }
    }
  }
}

TEST(RuntimeLinear, PackUnpackRoundTrip) {
  for (int64_t bits : {2, 3, 4, 8}) {
    const TestWeight w = make_weight(7, 200, 1, bits);
    EXPECT_EQ(w.packed.scalar_type(), at::kByte);
    EXPECT_EQ(w.packed.size(1), bits == 3 ? 96 : (200 + 128 / bits - 1) / (128 / bits) * 16);
    EXPECT_TRUE(at::equal(torchquant::unpack_weight(w.packed, bits, 200).to(at::kLong), w.codes));
    EXPECT_TRUE(at::allclose(torchquant::dequantize_weight(w.packed, w.scales, w.zeros, bits, 200),
                             reference_weight(w).first.to(at::kFloat)));
  }
}

TEST(RuntimeLinear, EveryKernelTableMatchesReference) {
  int tables = 0;
  for (const std::string isa : {"default", "avx2", "avx512"}) {
    const QuantLinearKernels* table = cpu::quantized_linear_kernels_for(isa);
    if (table == nullptr) continue;
    ++tables;
    check_table(*table, isa);
  }
  EXPECT_GE(tables, 1);
  EXPECT_NE(cpu::quantized_linear_kernels_for("default"), nullptr);
}

TEST(RuntimeLinear, DispatchedOpAndDtypes) {
  const TestWeight w = make_weight(24, 128, 2, 4);
  const auto [W, Wabs] = reference_weight(w);
  for (auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    const at::Tensor x = at::randn({2, 3, 128}).to(dtype);
    const at::Tensor y = torchquant::quantized_linear(x, w.packed, w.scales, w.zeros, 4, 128);
    EXPECT_EQ(y.scalar_type(), dtype);
    EXPECT_EQ(y.sizes(), (std::vector<int64_t>{2, 3, 24}));
    const at::Tensor xd = x.to(at::kDouble);
    expect_close(y, at::matmul(xd, W.t()), at::matmul(xd.abs(), Wabs.t()), "dispatched");
  }
}

TEST(RuntimeLinear, AutogradGivesInputAndBiasGradientsOnly) {
  const TestWeight w = make_weight(16, 96, 2, 3);
  const auto [W, Wabs] = reference_weight(w);
  const at::Tensor x = at::randn({5, 96}).set_requires_grad(true);
  const at::Tensor bias = at::randn({16}).set_requires_grad(true);
  const at::Tensor scales = w.scales.clone().set_requires_grad(true);
  const at::Tensor perm = at::randperm(96);
  const at::Tensor y =
      torchquant::quantized_linear(x, w.packed, scales, w.zeros, 3, 96, std::nullopt, perm, bias);
  const at::Tensor dy = at::randn({5, 16});
  y.backward(dy);
  at::Tensor expected = at::empty({5, 96}, at::kDouble);
  expected.index_put_({at::indexing::Slice(), perm}, at::matmul(dy.to(at::kDouble), W));
  at::Tensor terms = at::empty({5, 96}, at::kDouble);
  terms.index_put_({at::indexing::Slice(), perm}, at::matmul(dy.to(at::kDouble).abs(), Wabs));
  expect_close(x.grad(), expected, terms, "x.grad");
  EXPECT_TRUE(at::allclose(bias.grad(), dy.sum(0)));
  EXPECT_FALSE(scales.grad().defined());
}

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

TEST(RuntimeLinear, Errors) {
  const TestWeight w = make_weight(8, 64, 2, 4);
  const at::Tensor x = at::randn({2, 64});
  auto linear = [&](const at::Tensor& in, const at::Tensor& packed, int64_t bits,
                    std::optional<at::Tensor> lut, std::optional<at::Tensor> perm) {
    return [=] {
      torchquant::quantized_linear(in, packed, w.scales, w.zeros, bits, 64, lut, perm);
    };
  };
  EXPECT_TRUE(
      raises<c10::TypeError>(linear(x, w.packed.to(at::kChar), 4, {}, {}), "packed must be uint8"));
  EXPECT_TRUE(raises<c10::ValueError>(linear(x, w.packed.narrow(1, 0, 16), 4, {}, {}),
                                      "packed must have shape [out_features, 32]"));
  EXPECT_TRUE(raises<c10::ValueError>(linear(x, w.packed, 5, {}, {}), "bits must be 2, 3, 4 or 8"));
  EXPECT_TRUE(raises<c10::ValueError>(linear(at::randn({2, 63}), w.packed, 4, {}, {}),
                                      "input must have shape [..., in_features=64]"));
  EXPECT_TRUE(raises<c10::ValueError>(
      linear(x, torchquant::pack_weight(w.codes, 8), 8, at::rand({16}), {}), "needs bits == 4"));
  at::Tensor bad_perm = at::arange(64);
  bad_perm.index_put_({0}, 64);
  EXPECT_TRUE(
      raises<c10::ValueError>(linear(x, w.packed, 4, {}, bad_perm), "perm must hold indices"));
  // (A meta tensor mixed with CPU ones dispatches to the fake kernel, which is
  // registered from Python: tests/python/test_runtime_linear_errors.py.)
  EXPECT_TRUE(raises<c10::ValueError>([&] { torchquant::pack_weight(w.codes + 1, 4); },
                                      "codes must lie in [0, 15]"));
}

}  // namespace
}  // namespace torchquant::testing
