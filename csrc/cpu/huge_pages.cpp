#include "huge_pages.h"

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace torchquant::cpu {

void advise_huge_pages(const at::Tensor& fresh) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  // Below a few huge pages the buffer usually comes from memory the
  // allocator has already touched, and there is little to gain.
  constexpr size_t kMinBytes = 4 * kHugePage;
  const size_t bytes = fresh.nbytes();
  if (bytes < kMinBytes) return;
  const auto first = reinterpret_cast<uintptr_t>(fresh.data_ptr());
  // Only whole huge pages inside the buffer: the advice must not reach
  // memory that belongs to someone else.
  const uintptr_t begin = (first + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (first + bytes) & ~(kHugePage - 1);
  if (end > begin) {
    // A hint: failure (no THP support, THP disabled) leaves 4 KiB pages.
    (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#else
  (void)fresh;
#endif
}

}  // namespace torchquant::cpu
