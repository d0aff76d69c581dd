// Host-side setup of the fused softmax-KL op, shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <optional>

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
};

inline SoftmaxKLProblem prepare_softmax_kl(const at::Tensor& s, const at::Tensor& t,
                                           const std::optional<at::Tensor>& target,
                                           int64_t dim, double T, int64_t ignore_index,
                                           double alpha, double beta, bool decoupled,
                                           bool compute_grad) {
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
      !fits_layout(class_dim_view(at::empty_like(s), dim), p.layout)) {
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
  p.grad = compute_grad ? at::empty_like(p.s) : at::empty({0}, s.options());
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

}  // namespace kdfast
