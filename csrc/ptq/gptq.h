// The GPTQ operators (Frantar et al. 2022, arXiv 2210.17323), device
// independent: ATen for everything but the inner column loop, which a
// GptqBlockKernel does (gptq_block.h). Registered in register_gptq.cpp; the
// schemas are in csrc/ops.cpp, the public C++ API in
// include/torchquant/gptq.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace torchquant::ptq {

// hessian <- hessian * num_seen / (num_seen + n) + 2 / (num_seen + n) * X^T X,
// X = inputs viewed as [n, in_features] in float32.
void gptq_accumulate_hessian(at::Tensor& hessian, const at::Tensor& inputs, int64_t num_seen);

// (weight_q, codes, scales, zero_points, g_idx, loss, damp); see csrc/ops.cpp.
using GptqOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

GptqOutputs gptq_quantize(
    const at::Tensor& weight,
    const at::Tensor& hessian,
    int64_t quant_min,
    int64_t quant_max,
    bool symmetric,
    std::optional<int64_t> group_size,
    bool act_order,
    bool static_groups,
    int64_t block_size,
    double percdamp,
    int64_t clip_search_steps,
    double clip_max_shrink,
    bool rtn_fallback,
    const std::string& layer_name);

}  // namespace torchquant::ptq
