#include "fake_quant_reference.h"

#include <c10/core/WrapDimMinimal.h>

namespace torchquant::testing {
namespace {

// The input in float32, viewed so that scale and zero-point broadcast over
// it: per-channel puts the qparams on `axis`, per-group splits the last
// dimension into [groups, group_size].
struct Broadcast {
  at::Tensor x;
  at::Tensor scale;
  at::Tensor zero;  // rounded half to even, as the op does
};

Broadcast broadcast(const at::Tensor& input, const at::Tensor& scale,
                    const at::Tensor& zero_point, const Granularity& g) {
  Broadcast b{input.to(at::kFloat), scale.to(at::kFloat), zero_point.to(at::kFloat).round()};
  if (g.group_size.has_value()) {
    std::vector<int64_t> grouped = b.x.sizes().vec();
    grouped.back() /= *g.group_size;
    grouped.push_back(*g.group_size);
    b.x = b.x.reshape(grouped);
    b.scale = b.scale.unsqueeze(-1);
    b.zero = b.zero.unsqueeze(-1);
  } else if (g.axis.has_value()) {
    std::vector<int64_t> along_axis(b.x.dim(), 1);
    along_axis[c10::maybe_wrap_dim(*g.axis, b.x.dim())] = -1;
    b.scale = b.scale.reshape(along_axis);
    b.zero = b.zero.reshape(along_axis);
  } else {
    b.scale = b.scale.reshape({});
    b.zero = b.zero.reshape({});
  }
  return b;
}

// Unclamped integer codes; multiplying by the float reciprocal of the scale
// is the documented rounding of the op (and of torch.fake_quantize_*).
at::Tensor codes(const Broadcast& b) {
  return at::round(b.x * b.scale.reciprocal()) + b.zero;
}

// Sums a per-element term over each channel / group, back in qparam shape.
at::Tensor sum_per_grid(const at::Tensor& term, const Broadcast& b, const at::Tensor& like) {
  return term.to(at::kDouble).sum_to_size(b.scale.sizes()).reshape(like.sizes());
}

}  // namespace

Granularity per_tensor() { return {std::nullopt, std::nullopt, "per_tensor"}; }

Granularity per_channel(int64_t axis) {
  // Test names allow letters, digits and underscores only.
  const std::string axis_name = axis < 0 ? "minus" + std::to_string(-axis) : std::to_string(axis);
  return {axis, std::nullopt, "per_channel_axis" + axis_name};
}

Granularity per_group(int64_t group_size) {
  return {std::nullopt, group_size, "per_group" + std::to_string(group_size)};
}

std::vector<int64_t> qparam_shape(at::IntArrayRef input_sizes, const Granularity& g) {
  if (g.group_size.has_value()) {
    std::vector<int64_t> shape = input_sizes.vec();
    shape.back() /= *g.group_size;
    return shape;
  }
  if (g.axis.has_value()) {
    return {input_sizes[c10::maybe_wrap_dim(*g.axis, static_cast<int64_t>(input_sizes.size()))]};
  }
  return {1};
}

at::Tensor reference_fake_quantize(const at::Tensor& input, const at::Tensor& scale,
                                   const at::Tensor& zero_point, int64_t quant_min,
                                   int64_t quant_max, const Granularity& g) {
  const Broadcast b = broadcast(input, scale, zero_point, g);
  const at::Tensor clamped = codes(b).clamp(quant_min, quant_max);
  return ((clamped - b.zero) * b.scale).reshape(input.sizes()).to(input.scalar_type());
}

ReferenceGrads reference_grads(const at::Tensor& grad_output, const at::Tensor& input,
                               const at::Tensor& scale, const at::Tensor& zero_point,
                               int64_t quant_min, int64_t quant_max, const Granularity& g,
                               double grad_factor) {
  const Broadcast b = broadcast(input, scale, zero_point, g);
  const at::Tensor dy = grad_output.to(at::kFloat).reshape(b.x.sizes());
  const at::Tensor q = codes(b);
  const at::Tensor clamped = q.clamp(quant_min, quant_max);
  const at::Tensor x_hat = (clamped - b.zero) * b.scale;
  const at::Tensor inside = (q >= quant_min).logical_and(q <= quant_max);
  const at::Tensor zeros = at::zeros_like(dy);

  const at::Tensor dx = at::where(inside, dy, zeros);
  const at::Tensor dscale = at::where(inside, dy * (x_hat - b.x) / b.scale, dy * (clamped - b.zero));
  const at::Tensor dzero = at::where(inside, zeros, -dy * b.scale);
  return {
      dx.reshape(input.sizes()).to(input.scalar_type()),
      (sum_per_grid(dscale, b, scale) * grad_factor).to(at::kFloat),
      (sum_per_grid(dzero, b, zero_point) * grad_factor).to(at::kFloat),
  };
}

CodeCounts count_codes(const at::Tensor& input, const at::Tensor& scale,
                       const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                       const Granularity& g) {
  const at::Tensor q = codes(broadcast(input, scale, zero_point, g));
  const int64_t below = (q < quant_min).sum().item<int64_t>();
  const int64_t above = (q > quant_max).sum().item<int64_t>();
  return {below, q.numel() - below - above, above};
}

::testing::AssertionResult bit_equal(const at::Tensor& actual, const at::Tensor& expected) {
  if (actual.scalar_type() != expected.scalar_type() || actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure()
           << "got " << actual.scalar_type() << actual.sizes() << ", expected "
           << expected.scalar_type() << expected.sizes();
  }
  if (at::equal(actual, expected)) return ::testing::AssertionSuccess();
  const at::Tensor differs = actual.ne(expected).flatten();
  const int64_t first = differs.nonzero()[0][0].item<int64_t>();
  return ::testing::AssertionFailure()
         << differs.sum().item<int64_t>() << " of " << actual.numel()
         << " elements differ; first at flat index " << first << ": got "
         << actual.flatten()[first].item<double>() << ", expected "
         << expected.flatten()[first].item<double>();
}

::testing::AssertionResult all_close(const at::Tensor& actual, const at::Tensor& expected,
                                     double rtol, double atol) {
  if (actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure()
           << "got shape " << actual.sizes() << ", expected " << expected.sizes();
  }
  const at::Tensor a = actual.to(at::kDouble);
  const at::Tensor e = expected.to(at::kDouble);
  if (at::allclose(a, e, rtol, atol)) return ::testing::AssertionSuccess();
  const at::Tensor diff = (a - e).abs().flatten();
  const int64_t worst = diff.argmax().item<int64_t>();
  return ::testing::AssertionFailure()
         << "largest difference " << diff[worst].item<double>() << " at flat index " << worst
         << ": got " << a.flatten()[worst].item<double>() << ", expected "
         << e.flatten()[worst].item<double>() << " (rtol " << rtol << ", atol " << atol << ")";
}

}  // namespace torchquant::testing
