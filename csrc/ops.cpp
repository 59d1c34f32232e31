// The operator catalogue: every schema of the torchquant library, in one
// place. Kernels are registered per dispatch key elsewhere (cpu/, cuda/,
// autograd.cpp, runtime/); the fake (meta) kernels live in torchquant/ops/.
//
// Conventions shared by the fake-quantize ops:
//   * granularity: axis=None and group_size=None is per-tensor; axis=k is
//     per-channel along dimension k; group_size=g is per-group, groups of g
//     consecutive elements along the last dimension;
//   * scale is float32 with one entry per channel / group; zero_point is
//     float32 (rounded half to even) or an integer type, same shape;
//   * inputs are float32, float16 or bfloat16; the math is float32.
#include <torch/library.h>

TORCH_LIBRARY(torchquant, m) {
  m.def(
      "fake_quantize(Tensor input, Tensor scale, Tensor zero_point, int quant_min, "
      "int quant_max, int? axis=None, int? group_size=None, float grad_factor=1.0) -> Tensor");
  // Straight-through gradient of the input only (scale / zero-point fixed).
  m.def(
      "fake_quantize_backward(Tensor grad_output, Tensor input, Tensor scale, "
      "Tensor zero_point, int quant_min, int quant_max, int? axis=None, "
      "int? group_size=None) -> Tensor");
  // Gradients of input, scale and zero-point (LSQ / LSQ+), the latter two
  // multiplied by grad_factor, in one pass over the input.
  m.def(
      "fake_quantize_learnable_backward(Tensor grad_output, Tensor input, Tensor scale, "
      "Tensor zero_point, int quant_min, int quant_max, int? axis=None, "
      "int? group_size=None, float grad_factor=1.0) -> (Tensor, Tensor, Tensor)");
  // Calibration: the scale / zero-point of each grid that minimise
  // sum |fake_quantize(x) - x|^norm over the shrunk ranges
  // [s * min_val, s * max_val], s = 1 - k * max_shrink / steps, k < steps.
  m.def(
      "mse_clip_search(Tensor input, Tensor min_val, Tensor max_val, int quant_min, "
      "int quant_max, bool symmetric, int? axis=None, int? group_size=None, int steps=100, "
      "float max_shrink=0.8, float norm=2.0) -> (Tensor, Tensor)");
  // GPTQ (Frantar et al. 2022). Calibration: the layer Hessian, updated in
  // place with a batch of inputs [..., in]:
  //   hessian <- hessian * num_seen / (num_seen + n) + 2 / (num_seen + n) * X^T X.
  m.def("gptq_accumulate_hessian(Tensor(a!) hessian, Tensor inputs, int num_seen) -> ()");
  // Quantization of a weight [out, in] against its Hessian [in, in] (float32,
  // not modified). codes are int32 in [quant_min, quant_max] with
  // weight_q == (codes - zero_points[:, g_idx]) * scales[:, g_idx]; scales /
  // zero_points are [out, n_groups] float32; g_idx [in] int32 is each input
  // column's group; loss = tr((W - weight_q) H (W - weight_q)^T) / 2 with the
  // undamped H; damp is the damping used, -1 after a round-to-nearest fallback.
  m.def(
      "gptq_quantize(Tensor weight, Tensor hessian, int quant_min, int quant_max, bool symmetric, "
      "int? group_size=None, bool act_order=False, bool static_groups=False, int block_size=128, "
      "float percdamp=0.01, int clip_search_steps=0, float clip_max_shrink=0.8, "
      "bool rtn_fallback=False, str layer_name=\"\") -> (Tensor weight_q, Tensor codes, "
      "Tensor scales, Tensor zero_points, Tensor g_idx, Tensor loss, Tensor damp)");
  // AWQ (Lin et al. 2023). Calibration searches on the inputs x [tokens, in]
  // shared by one or more Linear layers; no autograd.
  // Per-input-channel scales s [in] (float32): for alpha = i / grid, i < grid,
  // s = mean|x|^alpha (duo_scaling: / (w_mean^(1 - alpha) + 1e-4)), clamped
  // to >= 1e-4 and divided by sqrt(max(s) min(s)); the s with the least
  // sum_k mean(((x / s) Q(W_k s)^T - x W_k^T)^2) (Q: a min/max grid per group
  // of group_size input columns, -1 for one per row). losses [grid] float32.
  m.def(
      "awq_search_scales(Tensor x, Tensor[] weights, Tensor[]? biases, int quant_min, "
      "int quant_max, bool symmetric, int group_size, int grid=20, bool duo_scaling=False) "
      "-> (Tensor scales, Tensor losses)");
  // Per (output channel, group) clipping range of weight [out, in]: the
  // shrunk range [f lo, f hi], f = 1 - k * max_shrink / steps, k < steps
  // (symmetric: lo = -max|w|, hi = max|w|), minimising the group's output
  // error over the tokens x[::max(1, tokens / max_tokens)]; out_chunk output
  // channels at a time. min_val / max_val are [out, in / group_size] float32.
  m.def(
      "awq_search_clip(Tensor x, Tensor weight, int quant_min, int quant_max, bool symmetric, "
      "int group_size, int steps=20, float max_shrink=0.5, int max_tokens=512, "
      "int out_chunk=256) -> (Tensor min_val, Tensor max_val)");
  // SmoothQuant (Xiao et al. 2022): the activation of one input channel j is
  // divided by s_j and the columns j of the Linear weights reading it are
  // multiplied by s_j, which leaves the float model's function unchanged.
  // s_j = act_absmax[j]^alpha / max_k,i |weights[k][i, j]|^(1 - alpha), alpha
  // in [0, 1], act_absmax [in] finite and positive; the weight maxima and s
  // are clamped below at eps. Returns float32 [in] (float64 for a float64
  // act_absmax).
  m.def("smoothquant_scales(Tensor act_absmax, Tensor[] weights, float alpha, float eps=1e-5) -> Tensor");
  // In place: prev_weight (a norm's [in] weight, or the [in, prev_in] weight
  // of the Linear producing the input) and prev_bias [in] divided by scales;
  // each next weight [out, in] has its columns multiplied by scales.
  m.def(
      "smoothquant_fold_(Tensor(a!) prev_weight, Tensor(b!)? prev_bias, Tensor(c!)[] next_weights, "
      "Tensor scales) -> ()");
  // W8A8 activations: dynamic symmetric quantization of each row of x [..., in].
  // scales [..., 1] float32 = max(max|row| / ((quant_max - quant_min) / 2),
  // float32 eps); codes = clamp(round(x * (1 / scales)), quant_min, quant_max),
  // int8 when the range fits in int8, int32 otherwise.
  m.def("quantize_per_token(Tensor x, int quant_min, int quant_max) -> (Tensor codes, Tensor scales)");

  // ---- Run-time kernels of quantized layers (csrc/runtime) -------------------------------
  // A low-bit weight W [N, K] is `packed` uint8 [N, packed_row_bytes(K, bits)] (layout:
  // csrc/runtime/packed_layout.h) with float32 `scales` / `zeros` [N, G], groups of
  // g = K / G input columns: W[n, k] = (v(u) - zeros[n, k / g]) * scales[n, k / g], v(u) = u,
  // or lut[u] with a float32 [16] `lut` (4-bit lookup-table codes such as NF4).
  // Codes u [N, K] (any integer dtype, values in [0, 2^bits)) -> packed uint8.
  m.def("pack_weight(Tensor codes, int bits) -> Tensor");
  // Packed uint8 -> codes uint8 [N, in_features].
  m.def("unpack_weight(Tensor packed, int bits, int in_features) -> Tensor");
  // The float32 weight [N, in_features] of a packed one (for references and tests; the
  // linear ops never form it).
  m.def(
      "dequantize_weight(Tensor packed, Tensor scales, Tensor zeros, int bits, int in_features, "
      "Tensor? lut=None) -> Tensor");
  // Weight-only quantized linear: y = x[..., perm] W^T + bias for x [..., in_features] in
  // float32 / float16 / bfloat16, y in x's dtype. perm (int64 [in_features], optional) is
  // the column order of an act-order weight repacked into group order. Autograd gives x the
  // gradient dy W (through quantized_linear_grad_input); the weight gets none.
  m.def(
      "quantized_linear(Tensor input, Tensor packed, Tensor scales, Tensor zeros, int bits, "
      "int in_features, Tensor? lut=None, Tensor? perm=None, Tensor? bias=None) -> Tensor");
  // dx [..., in_features] = (dy W)[..., perm^-1] for dy [..., N], in dy's dtype.
  m.def(
      "quantized_linear_grad_input(Tensor grad_output, Tensor packed, Tensor scales, Tensor zeros, "
      "int bits, int in_features, Tensor? lut=None, Tensor? perm=None) -> Tensor");
  // W8A8: int8 activations times int8 weights, int32 accumulation. The weight is the 8-bit
  // packed layout (u = q + 128 for int8 codes q) with float32 per-channel scales [N, 1].
  // input_scale None: dynamic per-token activation grids (quantize_per_token's); a float32
  // [1] tensor: one static symmetric grid, codes clamp(round(x / input_scale), -128, 127).
  // y = acc * s_x * s_w + bias in float32, returned in x's dtype. Autograd: the
  // straight-through input gradient dy W.
  // outlier_threshold > 0 (dynamic per-token grids only) is LLM.int8() (Dettmers et al.
  // 2022): the input columns holding a value with |x| >= outlier_threshold in any token
  // are multiplied in x's dtype against those columns of the dequantized weight; the
  // others through the int8 product, each token's grid found over its values below the
  // threshold. 0 turns the decomposition off.
  m.def(
      "w8a8_linear(Tensor input, Tensor packed, Tensor scales, Tensor? input_scale=None, "
      "Tensor? bias=None, float outlier_threshold=0.0) -> Tensor");

  // ---- Lookup-table (NF4 / FP4, double quantization) codes, block-wise absmax scaling ----
  // x (float, any shape) in consecutive blocks of block_size values of its flattened
  // form (the last block may be shorter): absmax [ceil(numel / block_size)] float32 =
  // max |x| of each block; codes uint8 (x's shape) = the level of `lut` (float32 [L],
  // 2 <= L <= 256, any order) nearest to x * (1 / max(absmax, 1e-38)) clamped to
  // [-1, 1], a value on a midpoint going to the lower level (torch.bucketize's rule,
  // as bitsandbytes quantizes).
  m.def("lut_quantize(Tensor x, Tensor lut, int block_size) -> (Tensor codes, Tensor absmax)");
  // float32 (codes' shape) = lut[codes] * absmax[block]: the inverse of lut_quantize.
  m.def("lut_dequantize(Tensor codes, Tensor absmax, Tensor lut, int block_size) -> Tensor");

  // ---- Rows quantized on their own asymmetric grid (the KV cache) ------------------------
  // x float [R, K] -> each row on the asymmetric min/max grid of `bits` (2, 4 or 8) bits,
  // the range widened to hold 0 (quant_math.h's grid_from_range): packed uint8
  // [R, packed_row_bytes(K, bits)] in the run-time layout, scales and zeros float32 [R, 1]
  // (zeros in the unsigned code domain), so dequantize_weight(packed, scales, zeros, bits, K)
  // gives the rows back. Keys quantized per channel are rows of x^T, values per token rows of x.
  m.def("quantize_rows(Tensor x, int bits) -> (Tensor packed, Tensor scales, Tensor zeros)");
}
