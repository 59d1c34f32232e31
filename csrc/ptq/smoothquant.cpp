#include "smoothquant.h"

#include "../fake_quant_args.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace torchquant::ptq {
namespace {

constexpr const char* kScalesOp = "torchquant.smoothquant_scales";
constexpr const char* kFoldOp = "torchquant.smoothquant_fold_";
constexpr const char* kPerTokenOp = "torchquant.quantize_per_token";

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

// "weights[2]" and the like.
std::string indexed(const char* name, size_t i) {
  return std::string(name) + "[" + std::to_string(i) + "]";
}

void check_float(const char* op, const std::string& name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(
      is_supported_float(t.scalar_type()), op, ": ", name,
      " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

void check_device(const char* op, const std::string& name, const at::Tensor& t,
                  const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(
      t.device() == ref.device(), op, ": ", name, " must be on the same device as ", ref_name,
      " (", ref.device(), "), got ", t.device());
}

// A Linear weight [out, in] whose columns are the channels of X.
void check_linear_weight(const char* op, const std::string& name, const at::Tensor& w,
                         int64_t in, const char* ref_name, const at::Tensor& ref) {
  check_float(op, name, w);
  TORCH_CHECK_VALUE(
      w.dim() == 2, op, ": ", name,
      " must be a 2-D Linear weight [out_features, in_features], got shape ", shape_str(w.sizes()));
  TORCH_CHECK_VALUE(
      w.size(1) == in, op, ": ", name, " must have in_features = ", ref_name, ".numel() = ", in,
      " columns, got shape ", shape_str(w.sizes()));
  check_device(op, name, w, ref_name, ref);
}

// The largest |value| of each channel, as one 1-D tensor: finite and
// positive, or a ValueError that says how many channels are not. One host
// synchronisation when all is well.
void check_activation_statistic(const char* op, const at::Tensor& act) {
  const at::Tensor finite = at::isfinite(act);
  const at::Tensor bad = finite.logical_not().logical_or(act <= 0);
  if (!bad.any().item<bool>()) return;
  const int64_t channels = act.numel();
  const int64_t nonfinite = finite.logical_not().sum().item<int64_t>();
  if (nonfinite > 0) {
    const int64_t first = finite.logical_not().nonzero().flatten()[0].item<int64_t>();
    TORCH_CHECK_VALUE(
        false, op, ": act_absmax must be finite, but ", nonfinite, " of its ", channels,
        " channels are NaN or Inf (first: channel ", first, " = ", act[first].item<double>(),
        "); the calibration activations were not finite");
  }
  const int64_t nonpositive = bad.sum().item<int64_t>();
  const int64_t first = bad.nonzero().flatten()[0].item<int64_t>();
  TORCH_CHECK_VALUE(
      false, op,
      ": act_absmax must be positive (the largest |activation| of each input channel), but ",
      nonpositive, " of its ", channels, " channels are <= 0 (first: channel ", first, " = ",
      act[first].item<double>(),
      "). A zero means the channel was never nonzero on the calibration data: calibrate on more "
      "(or more varied) data");
}

// max_i |w[i, j]| of each column of a Linear weight, in `dtype`; zeros for a
// weight without rows. NaN propagates.
at::Tensor column_absmax(const at::Tensor& w, at::ScalarType dtype) {
  if (w.size(0) == 0) return at::zeros({w.size(1)}, w.options().dtype(dtype));
  // Two reductions over w without an |w|-sized temporary. Not aminmax: its
  // column-wise (dim 0) reduction is not vectorised on CPU, and measured 7x
  // slower than amax + amin on a 4096 x 4096 weight.
  const at::Tensor hi = at::amax(w, /*dim=*/0);
  const at::Tensor lo = at::amin(w, /*dim=*/0);
  return at::maximum(hi.to(dtype), lo.to(dtype).neg());
}

// Whether two tensors may share elements. Views of one buffer that provably
// do not overlap (slices of a fused weight) are fine.
bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  return a.is_alias_of(b) && at::get_overlap_status(a, b) != at::MemOverlapStatus::No;
}

}  // namespace

at::Tensor smoothquant_scales(const at::Tensor& act_absmax, at::TensorList weights, double alpha,
                              double eps) {
  const char* op = kScalesOp;
  TORCH_CHECK_VALUE(
      alpha >= 0.0 && alpha <= 1.0, op,
      ": alpha (the migration strength) must be in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(
      std::isfinite(eps) && eps > 0.0, op, ": eps must be positive and finite, got ", eps);
  check_float(op, "act_absmax", act_absmax);
  TORCH_CHECK_VALUE(
      act_absmax.dim() == 1, op,
      ": act_absmax must be 1-D [in_features] (max |X| of each input channel), got shape ",
      shape_str(act_absmax.sizes()));
  TORCH_CHECK_VALUE(
      !weights.empty(), op,
      ": weights must hold at least one Linear weight [out_features, in_features] reading the "
      "input");
  const int64_t in = act_absmax.numel();
  for (size_t k = 0; k < weights.size(); ++k) {
    check_linear_weight(op, indexed("weights", k), weights[k], in, "act_absmax", act_absmax);
  }

  const at::ScalarType dtype = act_absmax.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor act = act_absmax.to(dtype);
  check_activation_statistic(op, act);

  std::vector<at::Tensor> per_weight;
  per_weight.reserve(weights.size());
  for (const at::Tensor& w : weights) per_weight.push_back(column_absmax(w, dtype));
  const at::Tensor stacked = at::stack(per_weight);  // [n_weights, in]
  if (!at::isfinite(stacked).all().item<bool>()) {
    for (size_t k = 0; k < per_weight.size(); ++k) {
      TORCH_CHECK_VALUE(
          at::isfinite(per_weight[k]).all().item<bool>(), op, ": ", indexed("weights", k),
          " contains NaN or Inf");
    }
  }
  const at::Tensor w_absmax = stacked.amax(/*dim=*/0).clamp_min(eps);

  // Both powers are finite: act and w_absmax are finite and positive, and
  // act^a * w^(a-1) lies between act and 1 / w (a weighted geometric mean).
  return at::pow(act, alpha).div_(at::pow(w_absmax, 1.0 - alpha)).clamp_min_(eps);
}

void smoothquant_fold_(const at::Tensor& prev_weight, const std::optional<at::Tensor>& prev_bias,
                       at::TensorList next_weights, const at::Tensor& scales) {
  const char* op = kFoldOp;
  check_float(op, "scales", scales);
  TORCH_CHECK_VALUE(
      scales.dim() == 1, op, ": scales must be 1-D [in_features], got shape ",
      shape_str(scales.sizes()));
  const int64_t in = scales.numel();

  check_float(op, "prev_weight", prev_weight);
  TORCH_CHECK_VALUE(
      (prev_weight.dim() == 1 || prev_weight.dim() == 2) && prev_weight.size(0) == in, op,
      ": prev_weight must be the 1-D weight [", in,
      "] of a norm layer or the 2-D weight [", in,
      ", prev_in_features] of the Linear that produces the input, got shape ",
      shape_str(prev_weight.sizes()));
  check_device(op, "prev_weight", prev_weight, "scales", scales);
  if (prev_bias.has_value()) {
    check_float(op, "prev_bias", *prev_bias);
    TORCH_CHECK_VALUE(
        prev_bias->dim() == 1 && prev_bias->size(0) == in, op, ": prev_bias must have shape [", in,
        "], got ", shape_str(prev_bias->sizes()));
    check_device(op, "prev_bias", *prev_bias, "scales", scales);
  }
  TORCH_CHECK_VALUE(
      !next_weights.empty(), op,
      ": next_weights must hold the weight of every Linear reading the input (at least one); "
      "folding into prev_weight alone would change the model");
  for (size_t k = 0; k < next_weights.size(); ++k) {
    check_linear_weight(op, indexed("next_weights", k), next_weights[k], in, "scales", scales);
  }

  // A tensor listed twice would be scaled twice, and scales must not change
  // while they are applied.
  std::vector<std::pair<std::string, const at::Tensor*>> touched{{"prev_weight", &prev_weight}};
  if (prev_bias.has_value()) touched.emplace_back("prev_bias", &*prev_bias);
  for (size_t k = 0; k < next_weights.size(); ++k) {
    touched.emplace_back(indexed("next_weights", k), &next_weights[k]);
  }
  for (size_t a = 0; a < touched.size(); ++a) {
    TORCH_CHECK_VALUE(
        !may_overlap(scales, *touched[a].second), op,
        ": scales shares memory with ", touched[a].first, ", which is modified in place");
    for (size_t b = a + 1; b < touched.size(); ++b) {
      TORCH_CHECK_VALUE(
          !may_overlap(*touched[a].second, *touched[b].second),
          op, ": ", touched[a].first, " and ", touched[b].first,
          " share memory; each tensor must appear once (it would be scaled twice)");
    }
  }

  const at::Tensor s_finite = at::isfinite(scales);
  if (!s_finite.logical_and(scales > 0).all().item<bool>()) {
    const int64_t bad = s_finite.logical_not().logical_or(scales <= 0).sum().item<int64_t>();
    TORCH_CHECK_VALUE(
        false, op, ": scales must be positive and finite, but ", bad, " of its ", in,
        " entries are not");
  }

  // In-place ATen arithmetic with a wider scales tensor computes in the wider
  // type and rounds the result once to the tensor's own dtype.
  if (prev_weight.dim() == 1) {
    prev_weight.div_(scales);
  } else {
    prev_weight.div_(scales.unsqueeze(1));
  }
  if (prev_bias.has_value()) prev_bias->div_(scales);
  const at::Tensor column_scales = scales.unsqueeze(0);
  for (const at::Tensor& w : next_weights) w.mul_(column_scales);
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, int64_t quant_min,
                                                      int64_t quant_max) {
  const char* op = kPerTokenOp;
  TORCH_CHECK_TYPE(
      x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
          x.scalar_type() == at::kBFloat16,
      op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  // A 2- to 16-bit range, checked as for the fake-quantize ops.
  check_grid_args(op, x, quant_min, quant_max, std::nullopt, std::nullopt);
  TORCH_CHECK_VALUE(
      x.dim() >= 1, op,
      ": x must have at least one dimension [..., in_features], got a 0-d tensor");
  TORCH_CHECK_VALUE(
      quant_min < 0 && quant_max > 0, op,
      ": the grid is symmetric (zero-point 0), so quant_min must be negative and quant_max "
      "positive, got [", quant_min, ", ", quant_max, "]");

  std::vector<int64_t> scale_shape = x.sizes().vec();
  scale_shape.back() = 1;
  at::Tensor absmax;
  if (x.size(-1) == 0) {
    absmax = at::zeros(scale_shape, x.options().dtype(at::kFloat));
  } else {
    auto [lo, hi] = at::aminmax(x, /*dim=*/-1, /*keepdim=*/true);
    absmax = at::maximum(hi.to(at::kFloat), lo.to(at::kFloat).neg());
  }
  const at::Tensor scale = absmax.div_(static_cast<double>(quant_max - quant_min) / 2.0)
                               .clamp_min_(kMinTokenScale);
  // On the CPU the check is cheap (one value per row). On a GPU it would
  // synchronise with the host; there a non-finite row keeps its NaN / Inf
  // scale, which turns the row's dequantized values into NaN.
  if (x.is_cpu()) {
    const at::Tensor finite = at::isfinite(scale);
    if (!finite.all().item<bool>()) {
      TORCH_CHECK_VALUE(
          false, op, ": x must be finite, but ", finite.logical_not().sum().item<int64_t>(),
          " of its ", scale.numel(), " rows contain NaN or Inf");
    }
  }
  // x * (1 / scale) in float32 (a float16 / bfloat16 x is promoted), as the
  // fake-quantize kernels compute it; round half to even, then clamp.
  const at::Tensor codes =
      at::mul(x, at::reciprocal(scale))
          .round_()
          .clamp_(static_cast<double>(quant_min), static_cast<double>(quant_max));
  const bool fits_int8 = quant_min >= -128 && quant_max <= 127;
  return {codes.to(fits_int8 ? at::kChar : at::kInt), scale};
}

}  // namespace torchquant::ptq
