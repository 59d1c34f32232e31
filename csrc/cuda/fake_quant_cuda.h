// CUDA element kernels of the fake-quantize ops (the contract is the one of
// FakeQuantKernels in fake_quant_ops.h). Host-only declarations, so the
// registration file compiles with the ordinary C++ compiler.
//
// scale and zero_point live on the GPU, so their values are not checked
// before launch (that would need a host synchronisation). Instead every
// kernel writes NaN to all outputs of a channel whose scale is not positive
// and finite or whose rounded zero-point is not inside [quant_min, quant_max]
// (NaN included): a bad quantization grid shows up in the result instead of
// silently producing plausible numbers.
#pragma once

#include "../fake_quant_ops.h"

namespace torchquant::cuda {

void forward(const FakeQuantArgs& args, at::Tensor& out);

void ste_backward(const FakeQuantArgs& args, const at::Tensor& grad_output,
                  at::Tensor& grad_input);

// Partial sums laid out [2, A, channels, B]; see fake_quant_learnable.cu for
// the two work decompositions and how A and B are chosen.
at::Tensor learnable_backward(const FakeQuantArgs& args, const at::Tensor& grad_output,
                              at::Tensor& grad_input);

}  // namespace torchquant::cuda
