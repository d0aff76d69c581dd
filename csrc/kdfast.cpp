// kdfast._C: the schemas of kdfast's compiled kernels and what the extension was built with.
//
// The kernels are plain PyTorch operators in the `kdfast_C` namespace; each device
// registers its implementation with TORCH_LIBRARY_IMPL next to the kernel
// (csrc/cpu/*.cpp, csrc/cuda/*.cu). The public ops, with autograd, fake kernels and the
// choice of backend, are the `kdfast::` custom ops defined in Python (kdfast/ops/).
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>
#include <tuple>
#include <vector>

#include "softmax_kl_plan.h"

namespace kdfast {
#if KDFAST_WITH_CUDA
std::string cuda_build_info();  // csrc/cuda/build_info.cu
#endif

// "key=value" lines, parsed by kdfast/_extension.py.
std::string build_info() {
  std::string info = "torch=" TORCH_VERSION "\n";
#if defined(__clang__)
  info += "compiler=clang " __clang_version__ "\n";
#elif defined(__GNUC__)
  info += "compiler=gcc " __VERSION__ "\n";
#else
  info += "compiler=unknown\n";
#endif
#if defined(CPU_CAPABILITY_AVX2)
  info += "cpu_capability=AVX2\n";
#else
  info += "cpu_capability=DEFAULT\n";
#endif
#if KDFAST_WITH_CUDA
  info += "cuda=1\n" + cuda_build_info();
#else
  info += "cuda=0\n";
#endif
  return info;
}

// The CUDA softmax-KL launch plan for a row of V classes on a device with these limits
// (csrc/softmax_kl_plan.h): [path, threads, cluster, slice, dynamic_smem, max_dynamic] and the path's
// name. limits: [cc_major, smem_optin, rows_static_smem, cluster_static_smem, clusters].
std::tuple<std::vector<int64_t>, std::string> softmax_kl_launch_plan(int64_t V, int64_t elem_size, bool acc_double,
                                                                     bool vec, std::vector<int64_t> limits) {
  TORCH_CHECK(limits.size() == 5, "kdfast: softmax_kl_launch_plan: limits needs 5 values, got ", limits.size());
  SoftmaxKLLimits d;
  d.cc_major = limits[0];
  d.smem_optin = limits[1];
  d.rows_static_smem = limits[2];
  d.cluster_static_smem = limits[3];
  d.clusters = limits[4] != 0;
  const SoftmaxKLPlan plan = plan_softmax_kl_rows(V, elem_size, acc_double, vec, d);
  return {{static_cast<int64_t>(plan.path), plan.threads, plan.cluster, plan.slice, plan.dynamic_smem,
           plan.max_dynamic},
          softmax_kl_path_name(plan, vec)};
}
}  // namespace kdfast

TORCH_LIBRARY(kdfast_C, m) {
  m.def("build_info() -> str", &kdfast::build_info);
  // Fused temperature-softmax divergence (csrc/softmax_kl_math.h): forward KL (decoupled:
  // DecoupledKD, row loss T^2 (alpha TCKD + beta NCKD), needs target), reverse_kl, jsd
  // (jsd_beta in (0, 1)) or tvd. Returns the scaled loss of every row (T^2; T for tvd; rows:
  // the input's shape without `dim`, opmath dtype) and, when compute_grad,
  // d(sum_rows scale * row_loss)/ds in s's dtype; scale is a 0-dim float64 tensor on s's device.
  m.def(
      "softmax_kl(Tensor s, Tensor t, Tensor? target, Tensor scale, int dim, float T, "
      "int ignore_index, float alpha, float beta, bool decoupled, "
      "bool compute_grad, str divergence=\"forward_kl\", float jsd_beta=0.5) -> (Tensor, Tensor)");
  // The same against a sparse (top-k) teacher: s [..., V] (classes last), indices [..., k]
  // int64 and the teacher's log-probabilities [..., k] in s's accumulation dtype; renormalize
  // or the tail bucket (csrc/softmax_kl_math.h). Returns the row losses [...] (opmath dtype)
  // and, when compute_grad, the gradient [..., V] contiguous in s's dtype.
  m.def(
      "softmax_kl_topk(Tensor s, Tensor indices, Tensor logprobs, Tensor? target, Tensor scale, float T, "
      "int ignore_index, str divergence, float jsd_beta, bool renormalize, bool compute_grad) -> (Tensor, Tensor)");
  // The CUDA kernels' launch plan (csrc/softmax_kl_plan.h), for tests on any machine.
  m.def("softmax_kl_launch_plan(int V, int elem_size, bool acc_double, bool vec, int[] limits) -> (int[], str)",
        &kdfast::softmax_kl_launch_plan);
  // The CUDA kernel path a softmax_kl call on these inputs takes (CUDA tensors only).
  m.def("softmax_kl_path(Tensor s, Tensor t, int dim, bool compute_grad) -> str");
  // grad *= grad_output (a scalar on the device), skipped on the device when it is 1.
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()");
  // Relational losses from the student's and teacher's Gram matrices [B, B] (float32 or
  // float64; csrc/relational_math.h). Each returns the loss (0-dim) and, when compute_grad,
  // S = dL/dG_s + dL/dG_s^T [B, B] (else an empty tensor): dL/dE_s = S E_s.
  // RKD: weighted distance + angle on the Gram of centred embeddings; pairs with
  // d2 <= tol (G_ii + G_jj) count as duplicate samples.
  m.def(
      "rkd_gram(Tensor G_s, Tensor G_t, float dist_weight, float angle_weight, float tol, "
      "bool compute_grad) -> (Tensor, Tensor)");
  m.def("pkt_gram(Tensor G_s, Tensor G_t, float eps, bool compute_grad) -> (Tensor, Tensor)");
  m.def("similarity_gram(Tensor G_s, Tensor G_t, float p, bool compute_grad) -> (Tensor, Tensor)");
  // Fused attention transfer over layer pairs (csrc/attention_math.h); all maps of a call
  // share one dtype and device. Forward: the loss summed over the pairs (0-dim, opmath
  // dtype) and per pair the [B, X] map w = d loss / d(mean_c f_s^p) that backward needs.
  // Backward: grad_loss * d loss / d f_s for every student map, laid out as empty_like(f_s).
  m.def("attention_transfer_forward(Tensor[] f_s, Tensor[] f_t, float p) -> (Tensor, Tensor[])");
  m.def("attention_transfer_backward(Tensor grad_loss, Tensor[] f_s, Tensor[] maps, float p) -> Tensor[]");
  // The CUDA kernel path an attention_transfer call on these maps takes (CUDA tensors only).
  m.def("attention_path(Tensor[] f_s, Tensor[] f_t, float p) -> str");
}

// `import kdfast._C` loads this library, which registers the operators above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
