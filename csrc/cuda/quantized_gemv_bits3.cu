// The GEMV kernels of quantized_linear for 3-bit codes (quantized_gemv.cuh).
#include "quantized_gemv.cuh"

namespace torchquant::cuda::gemv {
template void launch_bits<3>(const GemvArgs&, bool, bool, int, cudaStream_t);
}  // namespace torchquant::cuda::gemv
