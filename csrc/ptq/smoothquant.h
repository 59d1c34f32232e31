// SmoothQuant (Xiao et al. 2022, arXiv 2211.10438) and the dynamic
// activation quantization of W8A8 layers, written with ATen operators only so
// that one source serves every device (the work is a few reductions and
// element-wise passes; a hand-written kernel would not pay for itself).
// register_smoothquant.cpp registers these bodies as the torchquant ops.
//
// SmoothQuant moves the quantization difficulty of activation outliers into
// the weights: for the Linear layers that read one activation X [tokens, in],
//   y = X W^T = (X diag(s)^-1) (W diag(s))^T,
// and diag(s)^-1 is folded into whatever produced X (a norm layer's affine
// weight and bias, or the rows of a preceding Linear), so the float model
// computes the same function while X / s has flatter channels.
#pragma once

#include <ATen/core/Tensor.h>

#include <limits>
#include <optional>
#include <tuple>

namespace torchquant::ptq {

// Smoothing factor of each input channel j:
//   s_j = max|X_j|^alpha / max(w_j, eps)^(1 - alpha),  clamped below at eps,
//   w_j = max over every weight W_k [out_k, in] and every row i of |W_k[i, j]|.
// eps follows the reference implementation, which clamps the weight maxima
// and the result at 1e-5: it only matters for an input column that every
// weight ignores (all zeros), which would otherwise divide by zero. The
// activation statistic is not clamped: it must be finite and positive.
// Returns float32 [in] (float64 when act_absmax is float64).
at::Tensor smoothquant_scales(
    const at::Tensor& act_absmax,
    at::TensorList weights,
    double alpha,
    double eps);

// Folds the scales in place: prev_weight (1-D [in], a norm layer's weight;
// or 2-D [in, prev_in], the Linear that produces X) and prev_bias ([in]) are
// divided by s along the channels of X; every next weight [out, in] has its
// column j multiplied by s_j. Each tensor keeps its dtype and is rounded once
// (the arithmetic runs in the wider of its dtype and the scales' dtype).
void smoothquant_fold_(
    const at::Tensor& prev_weight,
    const std::optional<at::Tensor>& prev_bias,
    at::TensorList next_weights,
    const at::Tensor& scales);

// The smallest per-token scale (torch.finfo(torch.float32).eps, as
// torchquant's observers use): 1 / scale stays finite for a row of zeros.
// Public so that kernels which fuse the per-token quantization (the CPU W8A8
// linear, through quant_math.h's grid_from_range and unclamped_code) use the
// same grid as quantize_per_token.
constexpr float kMinTokenScale = std::numeric_limits<float>::epsilon();

// Dynamic symmetric quantization of each row (token) of x [..., in]:
//   scale = max(max_j |x_j| / ((quant_max - quant_min) / 2), float32 eps)
//   code  = clamp(round_half_even(x * (1 / scale)), quant_min, quant_max)
// with the formulas of torchquant's symmetric observers (qparams_from_range),
// so codes * scale is exactly torchquant.fake_quantize(x rows, scale, 0, ...)
// per channel. [-128, 127] gives scale = absmax / 127.5; [-127, 127] gives
// the absmax / 127 of LLM.int8() and the SmoothQuant reference code. A row of
// zeros gets the smallest scale and all-zero codes.
// Returns (codes [..., in]: int8 when [quant_min, quant_max] fits in int8,
// int32 otherwise; scales float32 [..., 1]).
std::tuple<at::Tensor, at::Tensor> quantize_per_token(
    const at::Tensor& x,
    int64_t quant_min,
    int64_t quant_max);

}  // namespace torchquant::ptq
