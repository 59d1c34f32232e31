// AWQ's scale and clipping searches on ATen tensors (see awq.h).
//
// Both searches compare a candidate's quantized weight with the float one
// through the layer's output on calibration inputs. Two equivalent forms of
// that error are used, whichever costs fewer multiplications:
//   * directly: ||x dW^T||^2 with dW the change of the effective weight
//     (n * in * out per candidate);
//   * through the Gram matrix G = x^T x, computed once: sum(dW G * dW)
//     (in * in * out per candidate), cheaper as soon as there are more
//     calibration rows than input features -- the usual case (AutoAWQ feeds
//     128 x 512 tokens to layers 4096 wide).
// The quantizer is torchquant's: a min/max grid per group (grid_from_range's
// formulas, computed here on tensors) and the fake_quantize op.
#include "awq.h"

#include "../clip_search.h"
#include "../fake_quant_args.h"

#include <torchquant/fake_quant.h>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace torchquant::ptq {
namespace {

constexpr const char* kScalesOp = "torchquant.awq_search_scales";
constexpr const char* kClipOp = "torchquant.awq_search_clip";

// Calibration rows converted to float32 at a time while accumulating the
// statistics of a large (half-precision) input.
constexpr int64_t kRowChunk = 8192;

// AutoAWQ's constants: the floor of a scale, and the terms that keep the
// duo-scaling ratio and the per-group weight normalisation finite.
constexpr double kMinActScale = 1e-4;
constexpr double kDuoEps = 1e-4;
constexpr double kGroupMaxEps = 1e-6;

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Calibration, not a training step: a host check of the values is fine.
bool all_finite(const at::Tensor& t) { return at::isfinite(t).all().item<bool>(); }

void check_matrix(const char* op, const std::string& name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.defined(), op, ": ", name, " must be a tensor, got an undefined one");
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(0) > 0 && t.size(1) > 0, op, ": ", name,
                    " must have at least one row and one column, got shape ", t.sizes());
  TORCH_CHECK_VALUE(all_finite(t), op, ": ", name, " contains NaN or Inf");
}

void check_same_device(const char* op, const std::string& name, const at::Tensor& t,
                       const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
                    " but x is on ", x.device());
}

void check_in_features(const char* op, const std::string& name, const at::Tensor& w,
                       const at::Tensor& x) {
  TORCH_CHECK_VALUE(w.size(1) == x.size(1), op, ": ", name, " has ", w.size(1),
                    " input features but x has ", x.size(1),
                    " (weights are [out_features, in_features], x is [tokens, in_features])");
  check_same_device(op, name, w, x);
}

// -1 is one group per row, as in the AWQ and GPTQ configs.
int64_t resolve_group_size(const char* op, int64_t group_size, int64_t in_features) {
  if (group_size == -1) return in_features;
  TORCH_CHECK_VALUE(group_size > 0, op,
                    ": group_size must be positive, or -1 for one group per row, got ", group_size);
  TORCH_CHECK_VALUE(in_features % group_size == 0, op, ": group_size (", group_size,
                    ") must divide in_features (", in_features, ")");
  return group_size;
}

void check_code_range(const char* op, const at::Tensor& weight, int64_t quant_min,
                      int64_t quant_max, bool symmetric) {
  // The same limits as the fake-quantize ops (2 to 16 bits); the weight's
  // dtype was checked already, so only the range can fail here.
  check_grid_args(op, weight, quant_min, quant_max, std::nullopt, std::nullopt);
  TORCH_CHECK_VALUE(!symmetric || (quant_min < 0 && quant_max > 0), op,
                    ": a symmetric grid has zero-point 0 and needs a signed code range "
                    "(quant_min < 0 < quant_max, e.g. [-8, 7]), got [",
                    quant_min, ", ", quant_max, "]");
}

// The min/max grid of each range [lo, hi]: grid_from_range (quant_math.h) on
// tensors, with the same float32 operations in the same order, so a grid
// found here is the one the observers and the clip search would build.
std::pair<at::Tensor, at::Tensor> minmax_grid(const at::Tensor& lo, const at::Tensor& hi,
                                              int64_t quant_min, int64_t quant_max,
                                              bool symmetric) {
  const auto qmin = static_cast<float>(quant_min);
  const auto qmax = static_cast<float>(quant_max);
  const at::Tensor l = lo.clamp_max(0.0);
  const at::Tensor h = hi.clamp_min(0.0);
  // Divide by a device tensor: a CUDA division by a host scalar multiplies
  // by its reciprocal instead, which can differ in the last bit.
  const auto constant = [&](float v) { return at::scalar_tensor(v, lo.options()); };
  if (symmetric) {
    at::Tensor scale =
        at::maximum(l.neg(), h).div_(constant((qmax - qmin) / 2.0f)).clamp_min_(kMinScale);
    at::Tensor zero = at::zeros_like(scale);
    return {std::move(scale), std::move(zero)};
  }
  at::Tensor scale = (h - l).div_(constant(qmax - qmin)).clamp_min_(kMinScale);
  at::Tensor zero = at::round(l / scale).neg_().add_(qmin).clamp_(qmin, qmax);
  return {std::move(scale), std::move(zero)};
}

// W [out, in] quantized group-wise on its own min/max grid, in float32.
at::Tensor quantize_minmax(const at::Tensor& w, int64_t group_size, int64_t quant_min,
                           int64_t quant_max, bool symmetric) {
  const int64_t out = w.size(0);
  const auto [lo, hi] = at::aminmax(w.view({out, -1, group_size}), -1);
  const auto [scale, zero] = minmax_grid(lo, hi, quant_min, quant_max, symmetric);
  return torchquant::fake_quantize(w, scale, zero, quant_min, quant_max, std::nullopt,
                                   group_size);
}

// What the scale search needs of the calibration input, in float32: the
// mean of |x| per channel, and either x itself or its Gram matrix x^T x.
struct InputStats {
  at::Tensor x_mean;  // [in]
  at::Tensor x;       // [n, in], when the error is computed directly
  at::Tensor gram;    // [in, in], otherwise
  int64_t rows = 0;
};

InputStats input_stats(const at::Tensor& x) {
  const int64_t n = x.size(0);
  const int64_t in = x.size(1);
  InputStats stats;
  stats.rows = n;
  const bool use_gram = n > in;
  if (n <= kRowChunk) {
    const at::Tensor xf = x.to(at::kFloat);
    stats.x_mean = xf.abs().mean(0);
    if (use_gram) {
      stats.gram = at::mm(xf.t(), xf);
    } else {
      stats.x = xf.contiguous();
    }
    return stats;
  }
  // Many rows: never hold a float32 copy of all of them (or of |x|).
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor abs_sum = at::zeros({in}, fopts);
  if (use_gram) {
    stats.gram = at::zeros({in, in}, fopts);
  } else {
    stats.x = x.to(at::kFloat).contiguous();
  }
  for (int64_t r = 0; r < n; r += kRowChunk) {
    const at::Tensor chunk = x.narrow(0, r, std::min(kRowChunk, n - r)).to(at::kFloat);
    abs_sum.add_(chunk.abs().sum(0));
    if (use_gram) stats.gram.addmm_(chunk.t(), chunk);
  }
  stats.x_mean = abs_sum.div_(static_cast<double>(n));
  return stats;
}

// AutoAWQ's w_mean: each weight divided by its group's max |w| (so every
// group lies in [0, 1]), then the mean over all rows of all the layers.
at::Tensor normalised_weight_mean(at::TensorList weights, int64_t group_size) {
  std::vector<at::Tensor> parts;
  parts.reserve(weights.size());
  for (const at::Tensor& weight : weights) {
    const at::Tensor a = weight.to(at::kFloat).abs().reshape({-1, group_size});
    parts.push_back((a / a.amax(1, /*keepdim=*/true).add_(kGroupMaxEps)).view(weight.sizes()));
  }
  return at::cat(parts).mean(0);
}

// AWQ's per-channel scales at grid point `ratio`.
at::Tensor candidate_scales(const at::Tensor& x_mean, const at::Tensor& w_mean, double ratio) {
  at::Tensor s = w_mean.defined()
                     ? x_mean.pow(ratio).div_(w_mean.pow(1.0 - ratio).add_(kDuoEps))
                     : x_mean.pow(ratio);
  s.clamp_min_(kMinActScale);
  s.div_((s.max() * s.min()).sqrt_());
  // AutoAWQ's guard against an overflowing normaliser.
  s.masked_fill_(at::isfinite(s).logical_not_(), 1.0);
  return s;
}

// mean((x / s) Q(W s)^T - x W^T)^2 over the layer's outputs, as
// mean(x dW^T)^2 with dW = Q(W s) / s - W (the bias cancels).
at::Tensor scaled_output_error(const at::Tensor& weight, const at::Tensor& s,
                               const InputStats& stats, int64_t group_size, int64_t quant_min,
                               int64_t quant_max, bool symmetric) {
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor dw = quantize_minmax(w * s, group_size, quant_min, quant_max, symmetric);
  dw.div_(s).sub_(w);
  const at::Tensor err = stats.gram.defined() ? at::mm(dw, stats.gram).mul_(dw)
                                              : at::mm(stats.x, dw.t()).square_();
  return err.sum().div_(static_cast<double>(stats.rows) * static_cast<double>(w.size(0)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> awq_search_scales(
    const at::Tensor& x,
    at::TensorList weights,
    std::optional<at::TensorList> biases,
    int64_t quant_min,
    int64_t quant_max,
    bool symmetric,
    int64_t group_size,
    int64_t grid,
    bool duo_scaling) {
  const char* op = kScalesOp;
  check_matrix(op, "x", x);
  TORCH_CHECK_VALUE(!weights.empty(), op,
                    ": weights must hold at least one weight [out_features, in_features]");
  for (size_t k = 0; k < weights.size(); ++k) {
    const std::string name = "weights[" + std::to_string(k) + "]";
    check_matrix(op, name, weights[k]);
    check_in_features(op, name, weights[k], x);
  }
  if (biases.has_value()) {
    TORCH_CHECK_VALUE(biases->size() == weights.size(), op,
                      ": biases must hold one bias per weight (", weights.size(), "), got ",
                      biases->size());
    for (size_t k = 0; k < biases->size(); ++k) {
      const at::Tensor& b = (*biases)[k];
      const std::string name = "biases[" + std::to_string(k) + "]";
      TORCH_CHECK_TYPE(is_float_dtype(b.scalar_type()), op, ": ", name,
                       " must be float32, float16 or bfloat16, got ", b.scalar_type());
      TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == weights[k].size(0), op, ": ", name,
                        " must have shape [", weights[k].size(0), "] (the out_features of weights[",
                        k, "]), got ", b.sizes());
      check_same_device(op, name, b, x);
      TORCH_CHECK_VALUE(all_finite(b), op, ": ", name, " contains NaN or Inf");
    }
  }
  const int64_t g = resolve_group_size(op, group_size, x.size(1));
  check_code_range(op, weights[0], quant_min, quant_max, symmetric);
  TORCH_CHECK_VALUE(grid >= 1, op, ": grid must be at least 1, got ", grid);

  c10::NoGradGuard no_grad;
  const InputStats stats = input_stats(x);
  const at::Tensor w_mean = duo_scaling ? normalised_weight_mean(weights, g) : at::Tensor();

  at::Tensor losses = at::empty({grid}, stats.x_mean.options());
  std::vector<at::Tensor> candidates;
  candidates.reserve(grid);
  for (int64_t i = 0; i < grid; ++i) {
    const double ratio = static_cast<double>(i) / static_cast<double>(grid);
    at::Tensor s = candidate_scales(stats.x_mean, w_mean, ratio);
    at::Tensor loss = at::zeros({}, losses.options());
    for (const at::Tensor& w : weights) {
      loss.add_(scaled_output_error(w, s, stats, g, quant_min, quant_max, symmetric));
    }
    losses.select(0, i).copy_(loss);
    candidates.push_back(std::move(s));
  }
  // argmin keeps the first of equal losses (the smallest alpha), as the
  // reference's strict "<" does; no host synchronisation.
  const at::Tensor best = losses.argmin().view({1});
  at::Tensor scales = at::stack(candidates).index_select(0, best).view({x.size(1)});
  return {std::move(scales), std::move(losses)};
}

std::tuple<at::Tensor, at::Tensor> awq_search_clip(
    const at::Tensor& x,
    const at::Tensor& weight,
    int64_t quant_min,
    int64_t quant_max,
    bool symmetric,
    int64_t group_size,
    int64_t steps,
    double max_shrink,
    int64_t max_tokens,
    int64_t out_chunk) {
  const char* op = kClipOp;
  check_matrix(op, "x", x);
  check_matrix(op, "weight", weight);
  check_in_features(op, "weight", weight, x);
  const int64_t in = x.size(1);
  const int64_t g = resolve_group_size(op, group_size, in);
  check_code_range(op, weight, quant_min, quant_max, symmetric);
  TORCH_CHECK_VALUE(steps >= 1 && steps <= 10000, op, ": steps must be in [1, 10000], got ",
                    steps);
  TORCH_CHECK_VALUE(max_shrink > 0.0 && max_shrink < 1.0, op,
                    ": max_shrink must be in (0, 1), got ", max_shrink);
  TORCH_CHECK_VALUE(max_tokens >= 1, op, ": max_tokens must be at least 1, got ", max_tokens);
  TORCH_CHECK_VALUE(out_chunk >= 1, op, ": out_chunk must be at least 1, got ", out_chunk);

  c10::NoGradGuard no_grad;
  const int64_t out = weight.size(0);
  const int64_t n_groups = in / g;
  // AutoAWQ's token sample: every (n / max_tokens)-th row, so between
  // max_tokens and 2 * max_tokens - 1 rows when n >= max_tokens.
  const int64_t stride = std::max<int64_t>(1, x.size(0) / max_tokens);
  const at::Tensor xs = x.slice(0, 0, x.size(0), stride).to(at::kFloat).contiguous();
  const int64_t m = xs.size(0);
  // [n_groups, m, g]: the sampled inputs of each group.
  const at::Tensor xg = xs.view({m, n_groups, g}).transpose(0, 1).contiguous();
  // Per group, sum_t (x_t . d)^2 = d^T (X^T X) d: the Gram form costs g
  // instead of m multiplications per weight and candidate.
  const bool use_gram = g <= m;
  const at::Tensor gram = use_gram ? at::bmm(xg.transpose(1, 2), xg) : at::Tensor();

  std::vector<float> factors(steps);
  for (int64_t k = 0; k < steps; ++k) {
    factors[k] = candidate_shrink(k, steps, static_cast<float>(max_shrink));
  }
  const auto fopts = xs.options();
  const at::Tensor factor_table =
      at::tensor(factors, at::TensorOptions().dtype(at::kFloat)).to(fopts.device());

  at::Tensor min_val = at::empty({out, n_groups}, fopts);
  at::Tensor max_val = at::empty({out, n_groups}, fopts);
  for (int64_t o = 0; o < out; o += out_chunk) {
    const int64_t c = std::min(out_chunk, out - o);
    const at::Tensor w = weight.narrow(0, o, c).to(at::kFloat).contiguous();
    const at::Tensor wv = w.view({c, n_groups, g});
    auto [lo, hi] = at::aminmax(wv, -1);
    if (symmetric) {
      // AutoAWQ clamps to [-max|w|, max|w|] scaled down.
      hi = at::maximum(lo.neg(), hi);
      lo = hi.neg();
    }
    at::Tensor best_err = at::full({c, n_groups}, std::numeric_limits<float>::infinity(), fopts);
    at::Tensor best_k = at::zeros({c, n_groups}, fopts.dtype(at::kLong));
    for (int64_t k = 0; k < steps; ++k) {
      const at::Tensor clo = lo * factors[k];
      const at::Tensor chi = hi * factors[k];
      const at::Tensor clipped = at::clamp(wv, clo.unsqueeze(-1), chi.unsqueeze(-1)).view({c, in});
      const auto [scale, zero] = minmax_grid(clo, chi, quant_min, quant_max, symmetric);
      // [n_groups, c, g]: each group's weight change.
      const at::Tensor d = torchquant::fake_quantize(clipped, scale, zero, quant_min, quant_max,
                                                     std::nullopt, g)
                               .sub_(w)
                               .view({c, n_groups, g})
                               .transpose(0, 1);
      const at::Tensor err = (use_gram ? at::bmm(d, gram).mul_(d).sum(-1)
                                       : at::bmm(xg, d.transpose(1, 2)).square_().sum(1))
                                 .t();
      // Strict: ties keep the earlier, wider range.
      const at::Tensor better = err < best_err;
      best_err = at::where(better, err, best_err);
      best_k.masked_fill_(better, k);
    }
    // The same float32 products as the candidates tried.
    const at::Tensor f = factor_table.index_select(0, best_k.view({-1})).view({c, n_groups});
    min_val.narrow(0, o, c).copy_(lo * f);
    max_val.narrow(0, o, c).copy_(hi * f);
  }
  return {std::move(min_val), std::move(max_val)};
}

}  // namespace torchquant::ptq
