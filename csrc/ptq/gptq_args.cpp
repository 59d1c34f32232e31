#include "gptq_args.h"

#include "../fake_quant_args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace torchquant::ptq {
namespace {

bool is_float_input(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// A Hessian accumulated by a matrix product is symmetric up to the order of
// its sums; anything further off is not a Hessian (a transposed or foreign
// matrix), and GPTQ would factorize one triangle while the loss used both.
constexpr double kSymmetryTolerance = 1e-3;

}  // namespace

std::string gptq_context(c10::string_view layer_name) {
  std::string ctx = "torchquant.gptq_quantize";
  if (!layer_name.empty()) {
    ctx += " (layer '";
    ctx.append(layer_name.data(), layer_name.size());
    ctx += "')";
  }
  return ctx;
}

void check_gptq_options(
    const std::string& ctx,
    const at::Tensor& weight,
    const at::Tensor& hessian,
    int64_t quant_min,
    int64_t quant_max,
    bool symmetric,
    std::optional<int64_t> group_size,
    bool static_groups,
    int64_t block_size,
    double percdamp,
    int64_t clip_search_steps,
    double clip_max_shrink) {
  TORCH_CHECK_TYPE(is_float_input(weight.scalar_type()), ctx,
                   ": weight must be float32, float16 or bfloat16, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, ctx,
                    ": weight must be 2-D [out_features, in_features] (flatten a convolution's "
                    "weight to [out, in * kh * kw] first), got shape ", weight.sizes());
  const int64_t in = weight.size(1);
  TORCH_CHECK_VALUE(in > 0, ctx, ": weight must have at least one input column, got shape ",
                    weight.sizes());
  TORCH_CHECK_TYPE(hessian.scalar_type() == at::kFloat, ctx, ": hessian must be float32, got ",
                   hessian.scalar_type());
  TORCH_CHECK_VALUE(hessian.dim() == 2 && hessian.size(0) == in && hessian.size(1) == in, ctx,
                    ": hessian must be [in_features, in_features] = [", in, ", ", in,
                    "] for a weight of shape ", weight.sizes(), ", got shape ", hessian.sizes());
  TORCH_CHECK_VALUE(hessian.device() == weight.device(), ctx,
                    ": hessian must be on the device of weight (", weight.device(), "), got ",
                    hessian.device());
  // The code range: the checks of the fake-quantize ops (2 to 16 bits).
  check_grid_args(ctx.c_str(), weight, quant_min, quant_max, std::nullopt, std::nullopt);
  TORCH_CHECK_VALUE(!symmetric || (quant_min < 0 && quant_max > 0), ctx,
                    ": a symmetric grid needs a signed code range (quant_min < 0 < quant_max, e.g. "
                    "[-8, 7] for 4 bits), got [", quant_min, ", ", quant_max, "]");
  if (group_size.has_value()) {
    const int64_t g = *group_size;
    TORCH_CHECK_VALUE(g > 0, ctx, ": group_size must be positive or None, got ", g);
    TORCH_CHECK_VALUE(in % g == 0, ctx, ": group_size (", g,
                      ") must divide in_features (weight.shape[1] = ", in, ")");
  }
  TORCH_CHECK_VALUE(!static_groups || group_size.has_value(), ctx,
                    ": static_groups=True needs a group_size (per-row grids are static already)");
  TORCH_CHECK_VALUE(block_size > 0, ctx, ": block_size must be positive, got ", block_size);
  TORCH_CHECK_VALUE(percdamp > 0.0 && percdamp <= 1.0, ctx,
                    ": percdamp must be in (0, 1] (a fraction of the mean Hessian diagonal), got ",
                    percdamp);
  TORCH_CHECK_VALUE(clip_search_steps >= 0 && clip_search_steps <= 10000, ctx,
                    ": clip_search_steps must be in [0, 10000] (0: min/max grids), got ",
                    clip_search_steps);
  TORCH_CHECK_VALUE(clip_max_shrink >= 0.0 && clip_max_shrink < 1.0, ctx,
                    ": clip_max_shrink must be in [0, 1), got ", clip_max_shrink);
}

void check_gptq_values(const std::string& ctx, const at::Tensor& weight,
                       const at::Tensor& hessian) {
  TORCH_CHECK_VALUE(at::isfinite(weight).all().item<bool>(), ctx,
                    ": weight contains NaN or Inf");
  // max |H| is NaN or Inf exactly when some entry is (the max propagates NaN).
  const double scale = at::linalg_vector_norm(hessian, INFINITY).item<double>();
  TORCH_CHECK_VALUE(std::isfinite(scale), ctx,
                    ": hessian contains NaN or Inf (were the calibration inputs finite?)");
  const double min_diag = hessian.diagonal().min().item<double>();
  TORCH_CHECK_VALUE(min_diag >= 0.0, ctx,
                    ": hessian must be positive semi-definite, but its diagonal has a negative "
                    "entry (", min_diag, ")");
  // An input that was always 0 has a zero row in X^T X, not just a zero
  // diagonal entry.
  const at::Tensor dead_rows = hessian.index({hessian.diagonal() == 0});
  if (dead_rows.numel() > 0) {
    const double off = dead_rows.abs().max().item<double>();
    TORCH_CHECK_VALUE(off == 0.0, ctx,
                      ": hessian must be positive semi-definite, but a row whose diagonal entry "
                      "is 0 has non-zero entries (max ", off, ")");
  }
  const double asymmetry = (hessian - hessian.t()).abs_().max().item<double>();
  TORCH_CHECK_VALUE(asymmetry <= kSymmetryTolerance * scale, ctx,
                    ": hessian must be symmetric, but max |H - H^T| = ", asymmetry,
                    " against max |H| = ", scale);
}

void check_accumulate_hessian_args(const at::Tensor& hessian, const at::Tensor& inputs,
                                   int64_t num_seen) {
  constexpr const char* op = "torchquant.gptq_accumulate_hessian";
  TORCH_CHECK_TYPE(hessian.scalar_type() == at::kFloat, op, ": hessian must be float32, got ",
                   hessian.scalar_type());
  TORCH_CHECK_VALUE(hessian.dim() == 2 && hessian.size(0) == hessian.size(1), op,
                    ": hessian must be a square matrix [in_features, in_features], got shape ",
                    hessian.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(inputs.scalar_type()), op,
                   ": inputs must be a floating-point tensor, got ", inputs.scalar_type());
  TORCH_CHECK_VALUE(inputs.dim() >= 1 && inputs.size(-1) == hessian.size(0), op,
                    ": inputs must have shape [..., in_features] with in_features = ",
                    hessian.size(0), " (the size of hessian), got shape ", inputs.sizes());
  TORCH_CHECK_VALUE(inputs.device() == hessian.device(), op,
                    ": inputs must be on the device of hessian (", hessian.device(), "), got ",
                    inputs.device());
  TORCH_CHECK_VALUE(num_seen >= 0, op, ": num_seen must be non-negative, got ", num_seen);
}

}  // namespace torchquant::ptq
