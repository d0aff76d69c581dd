// Host-side setup of the fused attention-transfer ops, shared by the CPU and CUDA kernels
// (math: attention_math.h).
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <vector>

#include "attention_math.h"
#include "common.h"

namespace kdfast {

// A feature map [B, C, *spatial] seen as [B, C, X] without a copy: the spatial dims merge
// into at most two runs, position x at (x / X2) * sx1 + (x % X2) * sx2. NCHW gives one run
// of stride 1, channels_last one run of stride C; slices of either stay views.
struct FeatureView {
  int64_t B = 1, C = 1, X = 1, X2 = 1;
  int64_t sb = 0, sc = 0, sx1 = 0, sx2 = 0;

  // One run of unit stride: positions are contiguous (NCHW).
  bool x_contiguous() const { return X == 1 || (X2 == X && sx2 == 1); }
  // Channels contiguous (channels_last).
  bool c_contiguous() const { return C == 1 || sc == 1; }
  int64_t offset(int64_t b, int64_t c, int64_t x) const {
    return b * sb + c * sc + (x / X2) * sx1 + (x % X2) * sx2;
  }
};

// false when the spatial dims need more than two runs (then the caller copies).
inline bool feature_view(const at::Tensor& f, FeatureView& v) {
  v.B = f.size(0);
  v.C = f.size(1);
  v.sb = f.stride(0);
  v.sc = f.stride(1);
  int64_t runs = 0, size[2] = {1, 1}, stride[2] = {0, 0};  // innermost run first
  for (int64_t d = f.dim() - 1; d >= 2; --d) {
    if (f.size(d) == 1) continue;
    if (runs > 0 && f.stride(d) == stride[runs - 1] * size[runs - 1]) {
      size[runs - 1] *= f.size(d);
      continue;
    }
    if (runs == 2) return false;
    size[runs] = f.size(d);
    stride[runs] = f.stride(d);
    ++runs;
  }
  v.X2 = size[0];
  v.sx2 = runs > 0 ? stride[0] : 1;
  v.sx1 = runs > 1 ? stride[1] : 0;
  v.X = size[0] * size[1];
  return true;
}

// f itself when it has a FeatureView, else a contiguous copy (rare: > 2 spatial runs).
inline at::Tensor viewable(const at::Tensor& f, FeatureView& v) {
  if (feature_view(f, v)) return f;
  at::Tensor copy = f.contiguous();
  feature_view(copy, v);
  return copy;
}

inline void check_attention_inputs(const std::vector<at::Tensor>& f_s, const std::vector<at::Tensor>& f_t,
                                   double p, const char* op) {
  KDFAST_CHECK(!f_s.empty(), op, ": no layer pairs");
  KDFAST_CHECK(f_t.empty() || f_s.size() == f_t.size(), op, ": ", f_s.size(), " student maps and ",
               f_t.size(), " teacher maps");
  KDFAST_CHECK(p > 0, op, ": p must be > 0, got ", p);
  const auto dtype = f_s[0].scalar_type();
  const auto device = f_s[0].device();
  for (size_t i = 0; i < f_s.size(); ++i) {
    for (const at::Tensor* f : {&f_s[i], f_t.empty() ? nullptr : &f_t[i]}) {
      if (f == nullptr) continue;
      KDFAST_CHECK(f->dim() >= 3, op, ": pair ", i, ": feature maps must be [B, C, *spatial], got ",
                   f->sizes());
      KDFAST_CHECK(f->scalar_type() == dtype, op, ": all feature maps must share one dtype (",
                   dtype, "), pair ", i, " has ", f->scalar_type());
      KDFAST_CHECK(f->device() == device, op, ": all feature maps must be on ", device);
      KDFAST_CHECK(f->numel() > 0, op, ": pair ", i, ": empty feature map ", f->sizes());
    }
    if (f_t.empty()) continue;
    KDFAST_CHECK(f_s[i].size(0) == f_t[i].size(0) && f_s[i].sizes().slice(2) == f_t[i].sizes().slice(2),
                 op, ": pair ", i, ": student ", f_s[i].sizes(), " and teacher ", f_t[i].sizes(),
                 " differ in batch or spatial size");
  }
}

struct AttentionForwardProblem {
  std::vector<at::Tensor> f_s, f_t;       // inputs (or contiguous copies), one dtype
  std::vector<FeatureView> v_s, v_t;
  std::vector<at::Tensor> maps;           // per pair [B, X], opmath dtype: r_s, then w in place
  std::vector<at::Tensor> teacher_means;  // per pair [B, X], opmath dtype: r_t
  at::Tensor sample_loss;                 // [sum of B over pairs], opmath dtype
  std::vector<int64_t> sample_begin;      // first sample of each pair in sample_loss
  double p;
};

inline AttentionForwardProblem prepare_attention_forward(const std::vector<at::Tensor>& f_s,
                                                         const std::vector<at::Tensor>& f_t, double p) {
  check_attention_inputs(f_s, f_t, p, "attention_transfer");
  KDFAST_CHECK(f_t.size() == f_s.size(), "attention_transfer: teacher maps missing");
  AttentionForwardProblem prob;
  prob.p = p;
  const auto acc = at::toOpMathType(f_s[0].scalar_type());
  const auto options = f_s[0].options().dtype(acc);
  int64_t samples = 0;
  for (size_t i = 0; i < f_s.size(); ++i) {
    FeatureView vs, vt;
    prob.f_s.push_back(viewable(f_s[i], vs));
    prob.f_t.push_back(viewable(f_t[i], vt));
    prob.v_s.push_back(vs);
    prob.v_t.push_back(vt);
    prob.maps.push_back(at::empty({vs.B, vs.X}, options));
    prob.teacher_means.push_back(at::empty({vt.B, vt.X}, options));
    prob.sample_begin.push_back(samples);
    samples += vs.B;
  }
  prob.sample_loss = at::empty({samples}, options);
  return prob;
}

struct AttentionBackwardProblem {
  std::vector<at::Tensor> f_s;     // inputs (or contiguous copies)
  std::vector<at::Tensor> grads;   // what is returned: empty_like(f_s) (the fake kernel's layout)
  std::vector<at::Tensor> out;     // where the kernel writes: grads, or a contiguous stand-in
  std::vector<at::Tensor> maps;    // per pair [B, X] opmath dtype, contiguous
  std::vector<FeatureView> v_f, v_g;
  double p;
};

inline AttentionBackwardProblem prepare_attention_backward(const std::vector<at::Tensor>& f_s,
                                                           const std::vector<at::Tensor>& maps, double p,
                                                           EmptyLikeFn empty_like = plain_empty_like) {
  check_attention_inputs(f_s, {}, p, "attention_transfer_backward");
  KDFAST_CHECK(maps.size() == f_s.size(), "attention_transfer_backward: ", maps.size(), " maps for ",
               f_s.size(), " feature maps");
  AttentionBackwardProblem prob;
  prob.p = p;
  const auto acc = at::toOpMathType(f_s[0].scalar_type());
  for (size_t i = 0; i < f_s.size(); ++i) {
    FeatureView vf, vg;
    prob.f_s.push_back(viewable(f_s[i], vf));
    at::Tensor grad = empty_like(f_s[i]);
    at::Tensor out = feature_view(grad, vg) ? grad : at::empty(grad.sizes(), grad.options());
    if (!out.is_same(grad)) feature_view(out, vg);
    prob.grads.push_back(grad);
    prob.out.push_back(out);
    prob.v_f.push_back(vf);
    prob.v_g.push_back(vg);
    KDFAST_CHECK(maps[i].dim() == 2 && maps[i].size(0) == vf.B && maps[i].size(1) == vf.X &&
                     maps[i].scalar_type() == acc && maps[i].device() == f_s[i].device(),
                 "attention_transfer_backward: map ", i, " of shape ", maps[i].sizes(), " and dtype ",
                 maps[i].scalar_type(), " does not fit feature map ", f_s[i].sizes());
    prob.maps.push_back(maps[i].contiguous());
  }
  return prob;
}

// After the kernel: copy stand-ins into the returned gradients.
inline std::vector<at::Tensor> finish_attention_backward(AttentionBackwardProblem& prob) {
  for (size_t i = 0; i < prob.grads.size(); ++i) {
    if (!prob.out[i].is_same(prob.grads[i])) prob.grads[i].copy_(prob.out[i]);
  }
  return prob.grads;
}

}  // namespace kdfast
