// Argument checks of the GPTQ ops: one message per mistake, naming the
// argument and what was expected (TypeError for a wrong dtype, ValueError for
// a wrong value or shape).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>

namespace torchquant::ptq {

// "torchquant.gptq_quantize (layer 'name')", or without the layer when the
// name is empty: the start of every message about one call.
std::string gptq_context(c10::string_view layer_name);

// Everything a shape, dtype or option can tell, without reading tensor data.
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
    double clip_max_shrink);

// The values: weight and hessian finite, hessian symmetric with a
// non-negative diagonal (on a GPU this synchronises, once per layer).
void check_gptq_values(const std::string& ctx, const at::Tensor& weight, const at::Tensor& hessian);

void check_accumulate_hessian_args(const at::Tensor& hessian, const at::Tensor& inputs,
                                   int64_t num_seen);

}  // namespace torchquant::ptq
