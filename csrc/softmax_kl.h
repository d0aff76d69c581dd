// Host-side setup of the fused softmax-KL op, shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/string_view.h>

#include <optional>
#include <vector>

#include "common.h"
#include "softmax_kl_math.h"

namespace kdfast {

// Rows: a row's classes are contiguous (stride_v == 1); one worker per row.
// Columns: rows are contiguous (stride_i == 1), e.g. [B, C, H, W] with dim=1; a worker
// takes a few neighbouring rows and walks their classes together.
enum class KernelLayout {
  Rows,
  Columns,
};

inline bool fits_layout(const ClassDimView& v, KernelLayout layout) {
  return v.ok && (layout == KernelLayout::Rows ? v.stride_v == 1 : v.stride_i == 1);
}

struct SoftmaxKLProblem {
  at::Tensor s, t;           // [.., V, ..] logits in one dtype, each fitting `layout`
  at::Tensor target;         // rows-shaped int64, contiguous; undefined when absent
  at::Tensor row_loss;       // rows-shaped, opmath dtype, contiguous
  at::Tensor grad;           // like s; empty when not computed
  ClassDimView view, t_view, grad_view;  // same A, V, I; own strides
  KernelLayout layout;
  double T, alpha, beta, scale;
  int64_t ignore_index;
  bool decoupled, compute_grad;
  Divergence divergence = Divergence::ForwardKL;
  double jsd_beta = 0.5;
};

// The schema's divergence names (kdfast/ops/softmax_kl.py DIVERGENCES).
inline Divergence parse_divergence(c10::string_view name) {
  if (name == "forward_kl") return Divergence::ForwardKL;
  if (name == "reverse_kl") return Divergence::ReverseKL;
  if (name == "jsd") return Divergence::JSD;
  if (name == "tvd") return Divergence::TVD;
  KDFAST_CHECK(false, "softmax_kl: unknown divergence '", name, "' (forward_kl, reverse_kl, jsd or tvd)");
  return Divergence::ForwardKL;
}

inline SoftmaxKLProblem prepare_softmax_kl(const at::Tensor& s, const at::Tensor& t,
                                           const std::optional<at::Tensor>& target,
                                           int64_t dim, double T, int64_t ignore_index,
                                           double alpha, double beta, bool decoupled,
                                           bool compute_grad, EmptyLikeFn empty_like = plain_empty_like) {
  KDFAST_CHECK(s.sizes() == t.sizes(), "softmax_kl: student ", s.sizes(), " and teacher ",
               t.sizes(), " logits differ in shape");
  KDFAST_CHECK(s.scalar_type() == t.scalar_type(), "softmax_kl: student and teacher dtypes differ");
  KDFAST_CHECK(s.device() == t.device(), "softmax_kl: student and teacher devices differ");
  KDFAST_CHECK(s.dim() >= 1 && dim >= 0 && dim < s.dim(), "softmax_kl: bad dim ", dim);
  KDFAST_CHECK(T > 0, "softmax_kl: T must be > 0, got ", T);
  SoftmaxKLProblem p;
  p.s = s;
  p.view = class_dim_view(s, dim);
  p.layout = p.view.stride_v == 1 ? KernelLayout::Rows : KernelLayout::Columns;
  // The gradient (and a teacher copy, if needed) take s's layout: empty_like keeps the
  // strides of a dense s; anything else (strided slices) gets one contiguous copy.
  if (!fits_layout(p.view, p.layout) ||
      !fits_layout(class_dim_view(at::empty_like(s, s.options().device(at::kMeta)), dim), p.layout)) {
    p.s = s.contiguous();
    p.view = class_dim_view(p.s, dim);
    p.layout = p.view.stride_v == 1 ? KernelLayout::Rows : KernelLayout::Columns;
  }
  p.t = fits_layout(class_dim_view(t, dim), p.layout) ? t : at::empty_like(p.s).copy_(t);
  p.t_view = class_dim_view(p.t, dim);
  std::vector<int64_t> rows_shape = s.sizes().vec();
  rows_shape.erase(rows_shape.begin() + dim);
  p.row_loss = at::empty(rows_shape, s.options().dtype(at::toOpMathType(s.scalar_type())));
  if (target.has_value()) {
    KDFAST_CHECK(target->numel() == p.row_loss.numel(), "softmax_kl: target has ",
                 target->numel(), " entries for ", p.row_loss.numel(), " rows");
    KDFAST_CHECK(target->device() == s.device(), "softmax_kl: target on another device");
    p.target = target->to(at::kLong).contiguous();
  }
  p.grad = compute_grad ? empty_like(p.s) : at::empty({0}, s.options());
  p.grad_view = compute_grad ? class_dim_view(p.grad, dim) : p.view;
  p.T = T;
  p.alpha = alpha;
  p.beta = beta;
  p.ignore_index = ignore_index;
  p.decoupled = decoupled;
  p.compute_grad = compute_grad;
  KDFAST_CHECK(!decoupled || p.target.defined(), "softmax_kl: decoupled mode needs a target");
  KDFAST_CHECK(!decoupled || p.view.V >= 2, "softmax_kl: decoupled mode needs >= 2 classes");
  return p;
}

// The divergence and JSD's beta of a call; DecoupledKD is a forward KL.
inline void set_divergence(SoftmaxKLProblem& p, c10::string_view divergence, double jsd_beta) {
  p.divergence = parse_divergence(divergence);
  KDFAST_CHECK(!p.decoupled || p.divergence == Divergence::ForwardKL, "softmax_kl: decoupled mode is a forward KL");
  KDFAST_CHECK((jsd_beta > 0 && jsd_beta < 1) || p.divergence != Divergence::JSD,
               "softmax_kl: jsd needs 0 < beta < 1 (its ends are forward_kl and reverse_kl), got ", jsd_beta);
  p.jsd_beta = jsd_beta;
}

// A sparse (top-k) teacher's problem (kdfast::softmax_kl_topk): the student's rows [R, V]
// with contiguous classes, the teacher's [R, k] int64 indices and log-probabilities in the
// accumulation dtype, contiguous; the gradient [R, V] contiguous.
struct SoftmaxKLTopKProblem {
  at::Tensor s, indices, logprobs, target, row_loss, grad;
  int64_t rows, V, k, s_row_stride;
  double T, jsd_beta;
  int64_t ignore_index;
  Divergence divergence;
  bool renormalize, compute_grad;
};

inline SoftmaxKLTopKProblem prepare_softmax_kl_topk(const at::Tensor& s, const at::Tensor& indices,
                                                    const at::Tensor& logprobs,
                                                    const std::optional<at::Tensor>& target, double T,
                                                    int64_t ignore_index, c10::string_view divergence,
                                                    double jsd_beta, bool renormalize, bool compute_grad,
                                                    EmptyLikeFn empty_like = plain_empty_like) {
  KDFAST_CHECK(s.dim() >= 1 && indices.dim() == s.dim() && logprobs.sizes() == indices.sizes() &&
                   s.sizes().slice(0, s.dim() - 1) == indices.sizes().slice(0, s.dim() - 1),
               "softmax_kl_topk: student ", s.sizes(), ", indices ", indices.sizes(), " and logprobs ",
               logprobs.sizes(), " must be [..., V], [..., k], [..., k]");
  KDFAST_CHECK(indices.scalar_type() == at::kLong, "softmax_kl_topk: indices must be int64");
  KDFAST_CHECK(logprobs.scalar_type() == at::toOpMathType(s.scalar_type()),
               "softmax_kl_topk: logprobs must be in the accumulation dtype of the student's");
  KDFAST_CHECK(s.device() == indices.device() && s.device() == logprobs.device(), "softmax_kl_topk: devices differ");
  KDFAST_CHECK(T > 0, "softmax_kl_topk: T must be > 0, got ", T);
  SoftmaxKLTopKProblem p;
  p.V = s.size(-1);
  p.k = indices.size(-1);
  KDFAST_CHECK(p.k >= 1 && p.k <= p.V, "softmax_kl_topk: k = ", p.k, " for ", p.V, " classes");
  KDFAST_CHECK(renormalize || T == 1, "softmax_kl_topk: tail='bucket' needs T = 1, got ", T);
  p.s = s.reshape({-1, p.V});
  if (p.V > 1 && p.s.stride(1) != 1) p.s = p.s.contiguous();
  p.rows = p.s.size(0);
  p.s_row_stride = p.s.stride(0);
  p.indices = indices.reshape({-1, p.k}).contiguous();
  p.logprobs = logprobs.reshape({-1, p.k}).contiguous();
  std::vector<int64_t> rows_shape = s.sizes().vec();
  rows_shape.pop_back();
  p.row_loss = at::empty(rows_shape, s.options().dtype(at::toOpMathType(s.scalar_type())));
  if (target.has_value()) {
    KDFAST_CHECK(target->numel() == p.rows, "softmax_kl_topk: target has ", target->numel(), " entries for ",
                 p.rows, " rows");
    KDFAST_CHECK(target->device() == s.device(), "softmax_kl_topk: target on another device");
    p.target = target->to(at::kLong).contiguous();
  }
  // The gradient: contiguous [..., V] (p.s is [R, V] with contiguous classes; a dense p.s is
  // contiguous, and empty_like gives anything else a contiguous tensor).
  p.grad = compute_grad ? empty_like(p.s).view(s.sizes()) : at::empty({0}, s.options());
  p.T = T;
  p.jsd_beta = jsd_beta;
  p.ignore_index = ignore_index;
  p.divergence = parse_divergence(divergence);
  KDFAST_CHECK((jsd_beta > 0 && jsd_beta < 1) || p.divergence != Divergence::JSD,
               "softmax_kl_topk: jsd needs 0 < beta < 1, got ", jsd_beta);
  p.renormalize = renormalize;
  p.compute_grad = compute_grad;
  return p;
}

}  // namespace kdfast
