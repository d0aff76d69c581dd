// Transparent huge pages for large, freshly allocated outputs on Linux.
//
// A large CPU tensor comes straight from mmap: its first write takes one page fault per
// 4 KB page, each zeroing the page — for the 262 MB gradient of 2048 x 32000 fp32 logits
// that is 64k faults, a third of the kernel's time. With THP in "madvise" mode (the
// common default) the kernel backs only advised ranges with 2 MB pages: 512x fewer faults.
// PyTorch does the same for every allocation under THP_MEM_ALLOC_ENABLE=1; kdfast asks
// only for the buffers its kernels are about to write in full.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kdfast {

inline void advise_huge_pages(const at::Tensor& out) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!out.defined() || !out.is_cpu() || out.nbytes() < 4 * kHuge) return;
  // Only the 2 MB-aligned ranges inside the tensor: neighbouring memory keeps its advice.
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + out.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only: failure is harmless
#else
  (void)out;
#endif
}

}  // namespace kdfast
