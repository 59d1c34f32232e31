// The operator catalogue: every schema of the torchquant library, in one
// place. Kernels are registered per dispatch key elsewhere (cpu/, cuda/,
// autograd.cpp); the fake (meta) kernels live in torchquant/ops.py.
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
}
