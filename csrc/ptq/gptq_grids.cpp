#include "gptq_grids.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace torchquant::ptq {

std::pair<at::Tensor, at::Tensor> group_grids(const at::Tensor& cols, int64_t g,
                                              const GridOptions& o) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torchquant::mse_clip_search", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool,
              std::optional<int64_t>, std::optional<int64_t>, int64_t, double, double)>();
  const int64_t k = cols.size(1) / g;
  if (cols.size(0) == 0) {  // a layer without outputs has no grids
    return {at::empty({0, k}, cols.options()), at::empty({0, k}, cols.options())};
  }
  const at::Tensor groups = cols.reshape({cols.size(0), k, g});
  const at::Tensor lo = groups.amin(2);
  const at::Tensor hi = groups.amax(2);
  // One candidate without shrinking is the plain min/max grid.
  const bool search = o.clip_search_steps > 0;
  auto [scale, zero] = op.call(cols, lo, hi, o.quant_min, o.quant_max, o.symmetric, std::nullopt, g,
                               search ? o.clip_search_steps : 1, search ? o.clip_max_shrink : 0.0,
                               /*norm=*/2.0);
  return {std::move(scale), std::move(zero)};
}

}  // namespace torchquant::ptq
