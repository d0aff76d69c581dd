// Reused memory for large CPU outputs (csrc/cpu/memory.h).
#include "cpu/memory.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "common.h"

namespace kdfast {
namespace {

constexpr size_t kHuge = size_t(2) << 20;       // transparent huge page size (x86-64, arm64 4K)
constexpr size_t kMinReused = size_t(8) << 20;  // smaller outputs: PyTorch's allocator
constexpr size_t kMaxKept = 8;

struct Block {
  void* ptr;
  size_t capacity;  // a multiple of kHuge
};

struct Allocation {  // a DataPtr's context
  Block block;
  size_t nbytes;
};

size_t default_limit() {
  if (const char* env = std::getenv("KDFAST_CPU_CACHE_MB"); env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long long mb = std::strtoll(env, &end, 10);
    KDFAST_CHECK(end != env && *end == '\0' && mb >= 0, "KDFAST_CPU_CACHE_MB must be a number of MB >= 0, got '",
                 env, "'");
    return static_cast<size_t>(mb) << 20;
  }
#if defined(__linux__)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page > 0) return static_cast<size_t>(pages) * static_cast<size_t>(page) / 4;
#endif
  return size_t(1) << 30;
}

#if defined(__linux__)
// `capacity` bytes at a 2 MB boundary, advised as huge pages (THP "madvise" mode backs
// only advised ranges); nullptr when the system has no memory left.
void* map_block(size_t capacity) {
  const size_t length = capacity + kHuge;
  void* raw = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const auto begin = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (begin + kHuge - 1) & ~(kHuge - 1);
  if (aligned > begin) munmap(raw, aligned - begin);
  if (const size_t tail = begin + length - (aligned + capacity); tail > 0) {
    munmap(reinterpret_cast<void*>(aligned + capacity), tail);
  }
#if defined(MADV_HUGEPAGE)
  madvise(reinterpret_cast<void*>(aligned), capacity, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
  return reinterpret_cast<void*>(aligned);
}

void unmap_block(const Block& b) { munmap(b.ptr, b.capacity); }
#endif

class Pool {
 public:
  // A block of at least `capacity` bytes: the smallest kept one up to twice that, or a new one.
  Block take(size_t capacity) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = kept_.end();
      for (auto it = kept_.begin(); it != kept_.end(); ++it) {
        if (it->capacity >= capacity && it->capacity <= 2 * capacity &&
            (best == kept_.end() || it->capacity < best->capacity)) {
          best = it;
        }
      }
      if (best != kept_.end()) {
        const Block b = *best;
        kept_bytes_ -= b.capacity;
        kept_.erase(best);
        return b;
      }
    }
#if defined(__linux__)
    void* ptr = map_block(capacity);
    if (ptr == nullptr) {  // memory is short: give back what is kept and try once more
      empty();
      ptr = map_block(capacity);
    }
    TORCH_CHECK_WITH(OutOfMemoryError, ptr != nullptr, "kdfast: out of memory allocating ", capacity, " bytes");
    return {ptr, capacity};
#else
    TORCH_CHECK(false, "kdfast: reused CPU memory is Linux-only");
#endif
  }

  void give_back(const Block& b) {
    std::vector<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      kept_.push_back(b);
      kept_bytes_ += b.capacity;
      while (!kept_.empty() && (kept_bytes_ > limit_ || kept_.size() > kMaxKept)) {
        drop.push_back(kept_.front());
        kept_bytes_ -= kept_.front().capacity;
        kept_.pop_front();
      }
    }
    release(drop);
  }

  void empty() {
    std::vector<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      drop.assign(kept_.begin(), kept_.end());
      kept_.clear();
      kept_bytes_ = 0;
    }
    release(drop);
  }

  std::vector<int64_t> info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(kept_bytes_), static_cast<int64_t>(kept_.size()), static_cast<int64_t>(limit_)};
  }

  void allocated(int64_t delta) { allocated_ += delta; }
  size_t allocated_bytes() const { return allocated_.load(); }

 private:
  static void release(const std::vector<Block>& blocks) {
#if defined(__linux__)
    for (const Block& b : blocks) unmap_block(b);
#else
    (void)blocks;
#endif
  }

  std::mutex mutex_;
  std::deque<Block> kept_;  // oldest first
  size_t kept_bytes_ = 0;
  const size_t limit_ = default_limit();
  std::atomic<int64_t> allocated_{0};
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may be freed during interpreter teardown
  return *p;
}

void report(void* ptr, int64_t delta) {
  pool().allocated(delta);
  c10::reportMemoryUsageToProfiler(ptr, delta, pool().allocated_bytes(), pool().allocated_bytes(),
                                   c10::Device(c10::DeviceType::CPU));
}

void free_allocation(void* context) {
  auto* a = static_cast<Allocation*>(context);
  report(a->block.ptr, -static_cast<int64_t>(a->nbytes));
  pool().give_back(a->block);
  delete a;
}

// A c10::Allocator, so that the storage behaves as any CPU storage (resizable, shareable).
class ReusingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinReused) return c10::GetDefaultCPUAllocator()->allocate(nbytes);
    const size_t capacity = (nbytes + kHuge - 1) / kHuge * kHuge;
    auto* a = new Allocation{pool().take(capacity), nbytes};
    report(a->block.ptr, static_cast<int64_t>(nbytes));
    return {a->block.ptr, a, &free_allocation, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

ReusingAllocator& reusing_allocator() {
  static ReusingAllocator* a = new ReusingAllocator();
  return *a;
}

}  // namespace

at::Tensor empty_like_reused(const at::Tensor& like) {
#if defined(__linux__)
  if (like.is_cpu() && like.nbytes() >= kMinReused) {
    // empty_like's sizes and strides, from a meta tensor laid out as `like` (no memory).
    const at::Tensor meta =
        at::empty_like(at::empty_strided(like.sizes(), like.strides(), like.options().device(at::kMeta)));
    return at::detail::empty_strided_generic(meta.sizes(), meta.strides(), &reusing_allocator(),
                                             c10::DispatchKeySet(c10::DispatchKey::CPU), like.scalar_type());
  }
#endif
  return at::empty_like(like);
}

std::vector<int64_t> cpu_cache_info() { return pool().info(); }

void empty_cpu_cache() { pool().empty(); }

}  // namespace kdfast
