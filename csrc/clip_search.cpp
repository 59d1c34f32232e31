#include "clip_search.h"

#include "fake_quant_args.h"

#include <ATen/ATen.h>

namespace torchquant {

std::tuple<at::Tensor, at::Tensor> mse_clip_search_with(
    ClipSearchKernel kernel,
    const at::Tensor& input,
    const at::Tensor& min_val,
    const at::Tensor& max_val,
    int64_t quant_min,
    int64_t quant_max,
    bool symmetric,
    std::optional<int64_t> axis,
    std::optional<int64_t> group_size,
    int64_t steps,
    double max_shrink,
    double norm) {
  constexpr const char* op = "torchquant.mse_clip_search";
  TORCH_CHECK_VALUE(steps >= 1 && steps <= 10000, op, ": steps must be in [1, 10000], got ", steps);
  TORCH_CHECK_VALUE(max_shrink >= 0.0 && max_shrink < 1.0, op,
                    ": max_shrink must be in [0, 1), got ", max_shrink);
  TORCH_CHECK_VALUE(norm > 0.0 && std::isfinite(norm), op, ": norm must be positive, got ", norm);
  TORCH_CHECK_TYPE(min_val.scalar_type() == at::kFloat && max_val.scalar_type() == at::kFloat, op,
                   ": min_val and max_val must be float32, got ", min_val.scalar_type(), " and ",
                   max_val.scalar_type());
  const GridShape grid = check_grid_args(op, input, quant_min, quant_max, axis, group_size);
  check_per_grid_tensor(op, "min_val", min_val, input, grid);
  check_per_grid_tensor(op, "max_val", max_val, input, grid);
  // Calibration, not a training step: a host check of the statistics is fine.
  TORCH_CHECK_VALUE(at::all(at::isfinite(min_val)).item<bool>() &&
                        at::all(at::isfinite(max_val)).item<bool>(),
                    op, ": min_val and max_val must be finite");
  TORCH_CHECK_VALUE(at::all(min_val <= max_val).item<bool>(), op,
                    ": min_val must not exceed max_val");

  const ChannelLayout& l = grid.layout;
  ClipSearchArgs args;
  // [outer, channels, inner] -> [channels, outer * inner]: one row per grid.
  args.rows = input.contiguous().view({l.outer, l.channels, l.inner}).transpose(0, 1).reshape({l.channels, -1}).contiguous();
  args.lo = min_val.contiguous().view({-1});
  args.hi = max_val.contiguous().view({-1});
  args.quant_min = static_cast<float>(quant_min);
  args.quant_max = static_cast<float>(quant_max);
  args.symmetric = symmetric;
  args.steps = steps;
  args.max_shrink = static_cast<float>(max_shrink);
  args.norm = static_cast<float>(norm);

  const auto opts = min_val.options().dtype(at::kFloat);
  at::Tensor err = at::empty({l.channels, steps}, opts);
  at::Tensor scale = at::empty({l.channels, steps}, opts);
  at::Tensor zero = at::empty({l.channels, steps}, opts);
  kernel(args, err, scale, zero);
  // argmin keeps the first of equal errors: the widest range wins ties.
  const at::Tensor best = err.argmin(1, /*keepdim=*/true);
  return {scale.gather(1, best).view(min_val.sizes()), zero.gather(1, best).view(min_val.sizes())};
}

}  // namespace torchquant
