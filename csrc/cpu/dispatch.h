// Which build of the CPU kernels runs: kdfast compiles csrc/cpu/kernels/*.cpp once per
// instruction set, as ATen does (CPU_CAPABILITY: DEFAULT everywhere, AVX2 and AVX512 on
// x86-64; see setup.py), each build into its own namespace kdfast::<capability> with a table
// of its entry points. The operators registered for the CPU (csrc/cpu/dispatch.cpp) call
// the table of the capability in use: by default ATen's own choice
// (torch.backends.cpu.get_cpu_capability(), which ATEN_CPU_CAPABILITY lowers), or
// KDFAST_CPU_CAPABILITY (default / avx2 / avx512) when set; never one this CPU lacks.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace kdfast {

// One build's entry points, a table per kernel file (defined at the end of each
// csrc/cpu/kernels/*.cpp): the kdfast_C operators' CPU implementations, with the signatures
// of their schemas (csrc/kdfast.cpp).
using Tensors = std::vector<at::Tensor>;
struct SoftmaxKLKernels {
  std::tuple<at::Tensor, at::Tensor> (*softmax_kl)(const at::Tensor& s, const at::Tensor& t,
                                                   const std::optional<at::Tensor>& target,
                                                   const at::Tensor& scale, int64_t dim, double T,
                                                   int64_t ignore_index, double alpha, double beta,
                                                   bool decoupled, bool compute_grad,
                                                   c10::string_view divergence, double jsd_beta);
  std::tuple<at::Tensor, at::Tensor> (*softmax_kl_topk)(const at::Tensor& s, const at::Tensor& indices,
                                                        const at::Tensor& logprobs,
                                                        const std::optional<at::Tensor>& target,
                                                        const at::Tensor& scale, double T, int64_t ignore_index,
                                                        c10::string_view divergence, double jsd_beta,
                                                        bool renormalize, bool compute_grad);
  at::Tensor (*cpu_exp)(const at::Tensor& x, c10::string_view impl, int64_t repeats);
};
struct AttentionKernels {
  std::tuple<at::Tensor, Tensors> (*forward)(at::TensorList f_s, at::TensorList f_t, double p);
  Tensors (*backward)(const at::Tensor& grad_loss, at::TensorList f_s, at::TensorList maps, double p);
};
using GramKernel = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor& g_s, const at::Tensor& g_t, double,
                                                          bool compute_grad);
struct RelationalKernels {
  std::tuple<at::Tensor, at::Tensor> (*rkd)(const at::Tensor& g_s, const at::Tensor& g_t, double dist_weight,
                                            double angle_weight, double tol, bool compute_grad);
  GramKernel pkt, similarity;
};

#define KDFAST_DECLARE_CPU_KERNELS(CAPABILITY)       \
  namespace CAPABILITY {                             \
  extern const SoftmaxKLKernels kSoftmaxKLKernels;   \
  extern const AttentionKernels kAttentionKernels;   \
  extern const RelationalKernels kRelationalKernels; \
  }

struct CpuKernels {
  const SoftmaxKLKernels* softmax_kl;
  const AttentionKernels* attention;
  const RelationalKernels* relational;
};

// The capability in use ("DEFAULT", "AVX2", "AVX512") and its kernels.
std::string cpu_capability();
const CpuKernels& cpu_kernels();
// The builds in this kdfast._C, comma-separated, and those this CPU can run.
std::string cpu_capabilities_built();
std::string cpu_capabilities_supported();
// Switch to another build (its name, any case); returns the previous one. For tests and
// benchmarks: raises for a build this CPU cannot run.
std::string set_cpu_capability(c10::string_view name);

}  // namespace kdfast
