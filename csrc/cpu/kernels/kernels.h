// The entry points of one build of the CPU kernels (csrc/cpu/dispatch.h), declared in the
// namespace of the build being compiled.
#pragma once
#include "cpu/dispatch.h"

namespace kdfast {
inline namespace CPU_CAPABILITY {

std::tuple<at::Tensor, at::Tensor> softmax_kl_cpu(const at::Tensor& s, const at::Tensor& t,
                                                  const std::optional<at::Tensor>& target,
                                                  const at::Tensor& scale, int64_t dim, double T,
                                                  int64_t ignore_index, double alpha, double beta,
                                                  bool decoupled, bool compute_grad);
std::tuple<at::Tensor, std::vector<at::Tensor>> attention_transfer_forward_cpu(at::TensorList f_s,
                                                                               at::TensorList f_t, double p);
std::vector<at::Tensor> attention_transfer_backward_cpu(const at::Tensor& grad_loss, at::TensorList f_s,
                                                        at::TensorList maps, double p);
at::Tensor cpu_exp(const at::Tensor& x, c10::string_view impl, int64_t repeats);

}  // namespace CPU_CAPABILITY
}  // namespace kdfast
