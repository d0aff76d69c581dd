// Which CUDA softmax-KL kernel runs a row layout, with how many threads and how much shared
// memory (csrc/cuda/softmax_kl.cu). Plain host arithmetic on the device's limits, so that
// the CPU tests check it for any GPU (the `softmax_kl_launch_plan` op) and the CUDA launch
// and kdfast's verification (the `softmax_kl_path` op) take the same decision.
//
// Shared memory: a block may use at most the device's opt-in limit (227 KB on sm_90), and
// its static shared memory counts against the same limit: a kernel with S bytes of static
// memory can be given at most (opt-in - S) bytes of dynamic memory, and only after its
// cudaFuncAttributeMaxDynamicSharedMemorySize was raised to that much (the default,
// 48 KB - S, is what a launch may ask for without it). The launcher raises it once per
// kernel and device to dynamic_smem_limit() and never asks for more.
#pragma once
#include <algorithm>
#include <cstdint>
#include <string>

namespace kdfast {

constexpr int64_t kSoftmaxKLCacheBudget = 100 * 1024;  // bytes of a row cached per block
constexpr int kSoftmaxKLMaxCluster = 8;                 // portable thread-block cluster size

enum class SoftmaxKLPath : int64_t { Columns = 0,
                                     RowsCached = 1,
                                     RowsUncached = 2,
                                     Cluster = 3 };

struct SoftmaxKLLimits {
  int64_t cc_major = 9;
  int64_t smem_optin = 232448;        // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int64_t rows_static_smem = 0;       // static shared memory of the caching rows kernel
  int64_t cluster_static_smem = 0;    // ... and of the cluster kernel
  bool clusters = true;               // thread-block clusters allowed (sm_90+, not turned off)
};

struct SoftmaxKLPlan {
  SoftmaxKLPath path = SoftmaxKLPath::RowsUncached;
  int64_t threads = 128;
  int64_t cluster = 1;       // blocks per row (Cluster)
  int64_t slice = 0;         // classes cached per block (Cluster)
  int64_t dynamic_smem = 0;  // bytes of dynamic shared memory per block
  int64_t max_dynamic = 0;   // the kernel's dynamic limit (its attribute, set once), >= dynamic_smem
};

// The dynamic shared memory a kernel with `static_smem` bytes of its own may be given.
inline int64_t softmax_kl_dynamic_limit(int64_t smem_optin, int64_t static_smem) {
  return std::min<int64_t>(kSoftmaxKLCacheBudget, smem_optin - static_smem);
}

// Threads for a row of work_items (16-byte packs or scalars): from 128 up to max_threads
// (1024; 512 for double math, whose ~70-80 registers per thread would not fit 1024 threads
// in a block's 64K registers), about 4 items a thread.
inline int64_t softmax_kl_threads(int64_t work_items, int64_t max_threads) {
  int64_t threads = 128;
  while (threads < max_threads && threads * 4 < work_items) threads *= 2;
  return threads;
}

inline int64_t softmax_kl_max_threads(bool acc_double) { return acc_double ? 512 : 1024; }

// Rows with contiguous classes (the columns layout is chosen by the caller from strides).
// vec: 16-byte loads possible (V and the row strides multiples of 16 bytes, aligned data).
inline SoftmaxKLPlan plan_softmax_kl_rows(int64_t V, int64_t elem_size, bool acc_double, bool vec,
                                          const SoftmaxKLLimits& d) {
  const int64_t N = vec ? 16 / elem_size : 1;
  const int64_t max_threads = softmax_kl_max_threads(acc_double);
  const int64_t row_bytes = 2 * V * elem_size;  // student and teacher
  const int64_t rows_limit = softmax_kl_dynamic_limit(d.smem_optin, d.rows_static_smem);
  SoftmaxKLPlan plan;
  // sm_90 and a row too large for one block's cache: split it over a cluster.
  if (vec && d.clusters && d.cc_major >= 9 && row_bytes > rows_limit) {
    int64_t cluster = 2;
    while (cluster < kSoftmaxKLMaxCluster && row_bytes > cluster * kSoftmaxKLCacheBudget) cluster *= 2;
    const int64_t slice = ((V + cluster - 1) / cluster + N - 1) / N * N;
    const int64_t smem = 2 * slice * elem_size;
    if (row_bytes <= cluster * kSoftmaxKLCacheBudget &&
        smem <= softmax_kl_dynamic_limit(d.smem_optin, d.cluster_static_smem)) {
      plan.path = SoftmaxKLPath::Cluster;
      plan.cluster = cluster;
      plan.slice = slice;
      plan.dynamic_smem = smem;
      plan.max_dynamic = softmax_kl_dynamic_limit(d.smem_optin, d.cluster_static_smem);
      plan.threads = softmax_kl_threads(slice / N, max_threads);
      return plan;
    }
  }
  plan.threads = softmax_kl_threads(V / N, max_threads);
  if (row_bytes <= rows_limit) {
    plan.path = SoftmaxKLPath::RowsCached;
    plan.dynamic_smem = row_bytes;
    plan.max_dynamic = rows_limit;
  }
  return plan;
}

// The kernel path's name, as kdfast's verification and `make gpu-check` report it.
inline std::string softmax_kl_path_name(const SoftmaxKLPlan& plan, bool vec) {
  std::string name;
  switch (plan.path) {
    case SoftmaxKLPath::Columns:
      return "columns";
    case SoftmaxKLPath::RowsCached:
      name = "rows-cached";
      break;
    case SoftmaxKLPath::RowsUncached:
      name = "rows-uncached";
      break;
    case SoftmaxKLPath::Cluster:
      name = "cluster-" + std::to_string(plan.cluster);
      break;
  }
  return vec ? name : name + "-scalar";
}

}  // namespace kdfast
