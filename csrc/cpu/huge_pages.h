// Transparent huge pages for freshly allocated kernel outputs.
//
// A large tensor from the CPU allocator is usually fresh mmap'ed memory, and
// the first write to each 4 KiB page faults. For a 64 MiB output those faults
// cost more than the kernel itself (measured: 45 ms of system time against
// about 15 ms of compute for a 4096 x 4096 fp32 fake-quantize on two cores).
// Advising the kernel to back the buffer with 2 MiB pages before the first
// write cuts the faults 512-fold. This is what PyTorch's own allocator does
// under THP_MEM_ALLOC_ENABLE=1, applied only to the outputs these kernels
// write; the advice is a hint and is ignored where unsupported.
#pragma once

#include <ATen/ATen.h>

namespace torchquant::cpu {

// Call before the first write to `fresh`; small tensors are left alone.
void advise_huge_pages(const at::Tensor& fresh);

}  // namespace torchquant::cpu
