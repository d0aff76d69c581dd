// Sparse (top-k) teachers on the CPU (csrc/cpu/kernels/softmax_kl_topk.cpp), compiled once
// per instruction set like every file of csrc/cpu/kernels/ (csrc/cpu/dispatch.h); its entry
// point joins the table of csrc/cpu/kernels/softmax_kl.cpp.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

#include "softmax_kl.h"

namespace kdfast {
inline namespace CPU_CAPABILITY {

// kdfast_C.softmax_kl_topk (schema: csrc/kdfast.cpp).
std::tuple<at::Tensor, at::Tensor> softmax_kl_topk_cpu(const at::Tensor& s, const at::Tensor& indices,
                                                       const at::Tensor& logprobs,
                                                       const std::optional<at::Tensor>& target,
                                                       const at::Tensor& scale, double T, int64_t ignore_index,
                                                       c10::string_view divergence, double jsd_beta, bool renormalize,
                                                       bool compute_grad);

}  // namespace CPU_CAPABILITY
}  // namespace kdfast
