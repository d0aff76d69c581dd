// Memory for the large outputs of kdfast's CPU kernels (the gradients they write in full).
//
// A fresh tensor of hundreds of MB costs more than the kernel that fills it: its first
// write faults in every page (the softmax-KL gradient of 2048 x 32000 fp32 logits is 64k
// faults of 4 KB, each zeroing its page), and on a virtual machine whose freed memory goes
// back to the host (free page reporting) the host faults it in again. Such outputs are
// allocated here instead: blocks of whole 2 MB pages advised as transparent huge pages,
// kept when their tensor is freed and handed to the next call that fits (an output of
// n bytes takes a kept block of n to 2n bytes), so that a training loop, which asks for
// the same sizes every step, writes into memory that is already mapped.
// Kept blocks are bounded: at most 8, together at most KDFAST_CPU_CACHE_MB (default a
// quarter of the machine's memory; 0 keeps nothing); the oldest go first.
// `torch.ops.kdfast_C.empty_cpu_cache()` returns them all. Outputs under 8 MB come from
// PyTorch's allocator as before. The profiler sees every allocation and free (peak-memory
// measurements count these tensors like any other).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace kdfast {

// at::empty_like(like): same sizes, strides (for a dense `like`, else contiguous), dtype.
at::Tensor empty_like_reused(const at::Tensor& like);

std::vector<int64_t> cpu_cache_info();  // bytes kept, blocks kept, limit in bytes
void empty_cpu_cache();

}  // namespace kdfast
