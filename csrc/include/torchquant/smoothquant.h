// Public C++ API of torchquant's SmoothQuant ops (Xiao et al. 2022) and of
// the per-token activation quantization of W8A8 layers. Each function calls
// the registered operator through the dispatcher; the ops are not
// differentiable.
//
//   // LayerNorm -> q, k, v: balance the activation outliers with the weights.
//   at::Tensor s = torchquant::smoothquant_scales(act_absmax, {wq, wk, wv}, 0.5);
//   torchquant::smoothquant_fold_(ln_weight, ln_bias, {wq, wk, wv}, s);
//
//   auto [codes, scales] = torchquant::quantize_per_token(x, -128, 127);
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torchquant {

// s_j = max|X_j|^alpha / max_k,i |W_k[i, j]|^(1 - alpha) for the Linear
// weights W_k [out_k, in] that read one input X, alpha in [0, 1]. act_absmax
// [in] must be finite and positive. The weight maxima and the result are
// clamped below at eps (as the reference implementation does). Returns
// float32 [in] (float64 for a float64 act_absmax).
at::Tensor smoothquant_scales(
    const at::Tensor& act_absmax,
    at::TensorList weights,
    double alpha,
    double eps = 1e-5);

// In place: prev_weight (a norm layer's [in] weight, or the [in, prev_in]
// weight of the Linear producing X) and prev_bias are divided by s; each next
// weight [out, in] has its columns multiplied by s. The float model computes
// the same function afterwards (up to rounding).
void smoothquant_fold_(
    const at::Tensor& prev_weight,
    const std::optional<at::Tensor>& prev_bias,
    at::TensorList next_weights,
    const at::Tensor& scales);

// Dynamic symmetric quantization of each row of x [..., in]:
// scale = max(absmax / ((quant_max - quant_min) / 2), float32 eps) [..., 1],
// codes = clamp(round(x * (1 / scale)), quant_min, quant_max), int8 when the
// range fits, int32 otherwise.
std::tuple<at::Tensor, at::Tensor> quantize_per_token(
    const at::Tensor& x,
    int64_t quant_min = -128,
    int64_t quant_max = 127);

}  // namespace torchquant
