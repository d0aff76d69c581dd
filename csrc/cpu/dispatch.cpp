// The CPU operators and the choice of the kernel build they run (csrc/cpu/dispatch.h).
// Compiled for the baseline ISA: nothing here may assume more than the oldest CPU.
#include "cpu/dispatch.h"

#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>

#include "common.h"

namespace kdfast {

KDFAST_DECLARE_CPU_KERNELS(DEFAULT)
#if KDFAST_CPU_X86
KDFAST_DECLARE_CPU_KERNELS(AVX2)
KDFAST_DECLARE_CPU_KERNELS(AVX512)
#endif

namespace {

struct Build {
  const char* name;
  CpuKernels kernels;
};

#define KDFAST_BUILD(CAPABILITY)                                                                                     \
  {                                                                                                                  \
    #CAPABILITY, { &CAPABILITY::kSoftmaxKLKernels, &CAPABILITY::kAttentionKernels, &CAPABILITY::kRelationalKernels } \
  }

// Most portable first: the index is the capability's rank.
const Build kBuilds[] = {
    KDFAST_BUILD(DEFAULT),
#if KDFAST_CPU_X86
    KDFAST_BUILD(AVX2),
    KDFAST_BUILD(AVX512),
#endif
};
constexpr int kNumBuilds = sizeof(kBuilds) / sizeof(kBuilds[0]);

// Whether this CPU (and its OS, for the wider registers) runs build i. The flags each build
// is compiled with (setup.py) are what is checked.
bool cpu_runs(int i) {
#if KDFAST_CPU_X86 && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  if (i == 1) return avx2;
  if (i == 2) {
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
#endif
  return i == 0;
}

int best_runnable() {
  int best = 0;
  for (int i = 0; i < kNumBuilds; ++i) {
    if (cpu_runs(i)) best = i;
  }
  return best;
}

int find_build(c10::string_view name) {
  std::string upper(name);
  std::transform(upper.begin(), upper.end(), upper.begin(), [](unsigned char c) { return std::toupper(c); });
  for (int i = 0; i < kNumBuilds; ++i) {
    if (upper == kBuilds[i].name) return i;
  }
  return -1;
}

int initial_build() {
  // ATen's choice (its own cpuid check, lowered by ATEN_CPU_CAPABILITY), capped at what
  // this CPU runs; a name kdfast has no build for (e.g. an arm64 SVE build) counts as DEFAULT.
  const int aten = std::max(0, find_build(at::get_cpu_capability()));
  int chosen = std::min(aten, best_runnable());
  if (const char* env = std::getenv("KDFAST_CPU_CAPABILITY"); env != nullptr && *env != '\0') {
    const int wanted = find_build(env);
    if (wanted < 0 || !cpu_runs(wanted)) {
      TORCH_WARN("kdfast: KDFAST_CPU_CAPABILITY=", env, " is not a kernel build this CPU runs (",
                 cpu_capabilities_supported(), "); using ", kBuilds[chosen].name);
    } else {
      chosen = wanted;
    }
  }
  return chosen;
}

std::atomic<int>& current_build() {
  static std::atomic<int> build{initial_build()};
  return build;
}

}  // namespace

std::string cpu_capability() { return kBuilds[current_build().load()].name; }

const CpuKernels& cpu_kernels() { return kBuilds[current_build().load()].kernels; }

std::string cpu_capabilities_built() {
  std::string names;
  for (int i = 0; i < kNumBuilds; ++i) names += (i ? "," : "") + std::string(kBuilds[i].name);
  return names;
}

std::string cpu_capabilities_supported() {
  std::string names;
  for (int i = 0; i < kNumBuilds; ++i) {
    if (cpu_runs(i)) names += (names.empty() ? "" : ",") + std::string(kBuilds[i].name);
  }
  return names;
}

std::string set_cpu_capability(c10::string_view name) {
  const int wanted = find_build(name);
  KDFAST_CHECK(wanted >= 0 && cpu_runs(wanted), "set_cpu_capability: '", std::string(name),
               "' is not a kernel build this CPU runs; choose one of ", cpu_capabilities_supported());
  return kBuilds[current_build().exchange(wanted)].name;
}

namespace {

std::tuple<at::Tensor, at::Tensor> softmax_kl(const at::Tensor& s, const at::Tensor& t,
                                              const std::optional<at::Tensor>& target, const at::Tensor& scale,
                                              int64_t dim, double T, int64_t ignore_index, double alpha,
                                              double beta, bool decoupled, bool compute_grad,
                                              c10::string_view divergence, double jsd_beta) {
  return cpu_kernels().softmax_kl->softmax_kl(s, t, target, scale, dim, T, ignore_index, alpha, beta, decoupled,
                                              compute_grad, divergence, jsd_beta);
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_topk(const at::Tensor& s, const at::Tensor& indices,
                                                   const at::Tensor& logprobs, const std::optional<at::Tensor>& target,
                                                   const at::Tensor& scale, double T, int64_t ignore_index,
                                                   c10::string_view divergence, double jsd_beta, bool renormalize,
                                                   bool compute_grad) {
  return cpu_kernels().softmax_kl->softmax_kl_topk(s, indices, logprobs, target, scale, T, ignore_index, divergence,
                                                   jsd_beta, renormalize, compute_grad);
}

at::Tensor cpu_exp(const at::Tensor& x, c10::string_view impl, int64_t repeats) {
  return cpu_kernels().softmax_kl->cpu_exp(x, impl, repeats);
}

std::tuple<at::Tensor, Tensors> attention_transfer_forward(at::TensorList f_s, at::TensorList f_t, double p) {
  return cpu_kernels().attention->forward(f_s, f_t, p);
}

Tensors attention_transfer_backward(const at::Tensor& grad_loss, at::TensorList f_s, at::TensorList maps,
                                    double p) {
  return cpu_kernels().attention->backward(grad_loss, f_s, maps, p);
}

std::tuple<at::Tensor, at::Tensor> rkd_gram(const at::Tensor& g_s, const at::Tensor& g_t, double dist_weight,
                                            double angle_weight, double tol, bool compute_grad) {
  return cpu_kernels().relational->rkd(g_s, g_t, dist_weight, angle_weight, tol, compute_grad);
}

std::tuple<at::Tensor, at::Tensor> pkt_gram(const at::Tensor& g_s, const at::Tensor& g_t, double eps,
                                            bool compute_grad) {
  return cpu_kernels().relational->pkt(g_s, g_t, eps, compute_grad);
}

std::tuple<at::Tensor, at::Tensor> similarity_gram(const at::Tensor& g_s, const at::Tensor& g_t, double p,
                                                   bool compute_grad) {
  return cpu_kernels().relational->similarity(g_s, g_t, p, compute_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast_C, CPU, m) {
  m.impl("softmax_kl", &softmax_kl);
  m.impl("softmax_kl_topk", &softmax_kl_topk);
  m.impl("attention_transfer_forward", &attention_transfer_forward);
  m.impl("attention_transfer_backward", &attention_transfer_backward);
  m.impl("cpu_exp", &cpu_exp);
  m.impl("rkd_gram", &rkd_gram);
  m.impl("pkt_gram", &pkt_gram);
  m.impl("similarity_gram", &similarity_gram);
}

}  // namespace kdfast
