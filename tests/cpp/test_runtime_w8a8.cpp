// torchquant::w8a8_linear through the public C++ API: bit for bit against the
// formula (written here with ATen, integer products exact in float64) on every
// kernel build the CPU runs, and the errors raised for bad arguments.
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <torchquant/torchquant.h>

#include <ATen/ATen.h>

#include <cstdlib>
#include <limits>
#include <optional>
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

// Sets TORCHQUANT_CPU_ISA (read by the op on every call) for one scope.
class ScopedIsa {
 public:
  explicit ScopedIsa(const char* isa) {
    if (isa == nullptr) {
      unsetenv("TORCHQUANT_CPU_ISA");
    } else {
      setenv("TORCHQUANT_CPU_ISA", isa, 1);
    }
  }
  ~ScopedIsa() { unsetenv("TORCHQUANT_CPU_ISA"); }
};

struct Weight {
  at::Tensor q;       // int8 codes as int64 [N, K]
  at::Tensor packed;  // u = q + 128, rows zero-padded to 16 bytes
  at::Tensor scales;  // float32 [N, 1]
};

Weight make_weight(int64_t n, int64_t k) {
  Weight w;
  w.q = at::randint(-128, 128, {n, k}, at::kLong);
  w.packed = at::zeros({n, (k + 15) / 16 * 16}, at::kByte);
  w.packed.narrow(1, 0, k).copy_(w.q + 128);
  w.scales = at::rand({n, 1}) * 0.01 + 1e-3;
  return w;
}

// y = acc * s_x * s_w + bias from the formula, in x's dtype.
at::Tensor reference(const at::Tensor& x, const Weight& w, const std::optional<at::Tensor>& input_scale,
                     const std::optional<at::Tensor>& bias) {
  const at::Tensor xf = x.to(at::kFloat);
  at::Tensor s_x;
  if (input_scale.has_value()) {
    s_x = input_scale->reshape({1, 1}).expand({x.size(0), 1});
  } else {
    s_x = (xf.abs().amax(1, true) / 127.5).clamp_min(std::numeric_limits<float>::epsilon());
  }
  const at::Tensor codes = at::round(xf * at::reciprocal(s_x)).clamp(-128, 127);
  const at::Tensor acc = at::matmul(codes.to(at::kDouble), w.q.to(at::kDouble).t());
  at::Tensor y = acc.to(at::kFloat) * s_x * w.scales.t();
  if (bias.has_value()) y = y + bias->to(at::kFloat);
  return y.to(x.scalar_type());
}

TEST(RuntimeW8A8, MatchesFormulaOnEveryKernelBuild) {
  at::manual_seed(0);
  for (const char* isa : {"default", "avx2", static_cast<const char*>(nullptr)}) {
    ScopedIsa scoped(isa);
    for (int64_t m : {1, 3, 17}) {
      for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
        const Weight w = make_weight(29, 100);  // K = 100: rows end 48 bytes into a 64-byte chunk
        const at::Tensor x = (at::randn({m, 100}) * 3).to(dtype);
        const at::Tensor bias = at::randn({29});
        for (const bool is_static : {false, true}) {
          const std::optional<at::Tensor> s =
              is_static ? std::optional<at::Tensor>(at::full({1}, 0.03f)) : std::nullopt;
          const at::Tensor y = torchquant::w8a8_linear(x, w.packed, w.scales, s, bias);
          EXPECT_TRUE(at::equal(y, reference(x, w, s, bias)))
              << "isa " << (isa ? isa : "native") << " M " << m << " " << dtype
              << (is_static ? " static" : " dynamic");
        }
      }
    }
  }
}

TEST(RuntimeW8A8, AccumulatesExactlyAtExtremeCodes) {
  // u = 255 or 0 against code -128 saturates a 16-bit pairwise product; unit
  // scales and integer x make y the int32 accumulator itself.
  at::manual_seed(1);
  Weight w = make_weight(3, 512);
  w.q.select(0, 0).fill_(127);
  w.q.select(0, 1).fill_(-128);
  w.packed.narrow(1, 0, 512).copy_(w.q + 128);
  const at::Tensor x = at::full({2, 512}, -128.0f);
  x.select(0, 1).fill_(127.0f);
  for (const char* isa : {"default", "avx2", static_cast<const char*>(nullptr)}) {
    ScopedIsa scoped(isa);
    const at::Tensor y = torchquant::w8a8_linear(x, w.packed, at::ones({3, 1}), at::ones({1}));
    EXPECT_TRUE(at::equal(y.to(at::kDouble), at::matmul(x.to(at::kDouble), w.q.to(at::kDouble).t())));
  }
}

TEST(RuntimeW8A8, BadArgumentsRaise) {
  const Weight w = make_weight(8, 40);
  const at::Tensor x = at::randn({3, 40});
  EXPECT_TRUE(raises<c10::TypeError>([&] { torchquant::w8a8_linear(x.to(at::kInt), w.packed, w.scales); }, "input"));
  EXPECT_TRUE(raises<c10::TypeError>([&] { torchquant::w8a8_linear(x, w.packed.to(at::kChar), w.scales); }, "packed"));
  EXPECT_TRUE(raises<c10::ValueError>([&] { torchquant::w8a8_linear(x, w.packed.narrow(1, 0, 32), w.scales); }, "packed"));
  EXPECT_TRUE(raises<c10::ValueError>([&] { torchquant::w8a8_linear(x.narrow(1, 0, 20), w.packed, w.scales); }, "packed"));
  EXPECT_TRUE(raises<c10::ValueError>([&] { torchquant::w8a8_linear(x, w.packed, w.scales.reshape({-1})); }, "scales"));
  EXPECT_TRUE(raises<c10::TypeError>([&] { torchquant::w8a8_linear(x, w.packed, w.scales.to(at::kDouble)); }, "scales"));
  EXPECT_TRUE(raises<c10::ValueError>([&] { torchquant::w8a8_linear(x, w.packed, w.scales, at::ones({2})); }, "input_scale"));
  EXPECT_TRUE(raises<c10::ValueError>([&] { torchquant::w8a8_linear(x, w.packed, w.scales, at::zeros({1})); }, "input_scale"));
  EXPECT_TRUE(raises<c10::ValueError>([&] { torchquant::w8a8_linear(x, w.packed, w.scales, std::nullopt, at::zeros({9})); }, "bias"));
  at::Tensor nan_x = x.clone();
  nan_x.index_put_({1, 2}, std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE(raises<c10::ValueError>([&] { torchquant::w8a8_linear(nan_x, w.packed, w.scales); }, "finite"));
}

}  // namespace
}  // namespace torchquant::testing
