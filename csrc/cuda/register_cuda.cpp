// CUDA registrations of the torchquant ops. Host code only: the kernels are
// in the .cu files next to it.
#include "fake_quant_cuda.h"

#include "../clip_search.h"
#include "../register_backend.h"

#include <torch/library.h>

namespace torchquant::cuda {

// Defined in clip_search.cu.
void clip_search(const ClipSearchArgs& args, at::Tensor& err, at::Tensor& scale,
                 at::Tensor& zero);

namespace {

// scale / zero_point stay on the GPU: the kernels poison bad channels with
// NaN instead of a host-side check (see fake_quant_cuda.h).
const FakeQuantKernels& cuda_kernels() {
  static const FakeQuantKernels kernels{&forward, &ste_backward, &learnable_backward,
                                        /*check_values_on_host=*/false};
  return kernels;
}

ClipSearchKernel cuda_clip_search_kernel() { return &clip_search; }

}  // namespace

TORCH_LIBRARY_IMPL(torchquant, CUDA, m) {
  register_backend_ops<&cuda_kernels, &cuda_clip_search_kernel>(m);
}

}  // namespace torchquant::cuda
