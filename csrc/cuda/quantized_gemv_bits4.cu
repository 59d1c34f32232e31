// The GEMV kernels of quantized_linear for 4-bit codes (quantized_gemv.cuh).
#include "quantized_gemv.cuh"

namespace torchquant::cuda::gemv {
template void launch_bits<4>(const GemvArgs&, bool, bool, int, cudaStream_t);
}  // namespace torchquant::cuda::gemv
