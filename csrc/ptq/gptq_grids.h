// The quantization grids of GPTQ's groups, computed with ATen and the
// mse_clip_search op (so on any device, with the element math of
// quant_math.h's grid_from_range).
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

namespace torchquant::ptq {

struct GridOptions {
  int64_t quant_min = 0;
  int64_t quant_max = 0;
  bool symmetric = true;
  // 0: the min/max grid; > 0: the MSE-best of that many shrunk ranges.
  int64_t clip_search_steps = 0;
  double clip_max_shrink = 0.8;
};

// The grid of every (row, group of `g` consecutive columns) of `cols`
// ([rows, k * g], any strides): (scale, zero), each [rows, k] float32.
std::pair<at::Tensor, at::Tensor> group_grids(const at::Tensor& cols, int64_t g,
                                              const GridOptions& options);

}  // namespace torchquant::ptq
