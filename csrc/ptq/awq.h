// AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM
// Compression and Acceleration", arXiv 2306.00978): the two searches of the
// method, written with ATen operations so that one source runs on every
// device. The semantics follow the reference implementations (llm-awq's
// auto_scale / auto_clip, AutoAWQ's AwqQuantizer); where torchquant's own
// conventions differ (the min/max grid, float32 statistics) the op docs in
// csrc/ops.cpp and torchquant/ops/ say so.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torchquant::ptq {

// Per-input-channel scales s of the layers that read the same input x: the
// grid point alpha = i / grid (i < grid) whose s = mean|x|^alpha (duo
// scaling: mean|x|^alpha / (w_mean^(1 - alpha) + 1e-4)), clamped to 1e-4 and
// normalised by sqrt(max(s) * min(s)), gives the least output error
// sum_k mean((x / s) Q(W_k s)^T - x W_k^T)^2. Returns (scales [in] float32,
// losses [grid] float32).
std::tuple<at::Tensor, at::Tensor> awq_search_scales(
    const at::Tensor& x,
    at::TensorList weights,
    std::optional<at::TensorList> biases,
    int64_t quant_min,
    int64_t quant_max,
    bool symmetric,
    int64_t group_size,
    int64_t grid,
    bool duo_scaling);

// Per (output channel, group) clipping range of `weight`: the shrink factor
// f = 1 - k * max_shrink / steps (k < steps) of the group's range whose
// clamped, quantized weights give the least output error
// sum_t (x_t,g . (Q(clamp(w_g)) - w_g))^2 over the sampled tokens. Returns
// (min_val, max_val), each [out, in / group_size] float32.
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
    int64_t out_chunk);

}  // namespace torchquant::ptq
