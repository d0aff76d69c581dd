// Fused temperature-softmax KL on the CPU (math: softmax_kl_math.h).
//
// One worker owns whole rows. Per row: sweep 1 reads s and t for their maxima; sweep 2
// reads them again (from L2: a row of 32k fp32 logits is 128 KB) for the exponentials,
// keeping exp((x - M)/T) in a per-thread fp32 scratch row; sweep 3 writes the gradient
// from the scratch row. Memory beyond the inputs and the gradient: O(rows) + 2 rows of
// scratch per thread. Two exponentials per element, vectorized (ATen Vectorized, SLEEF).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "huge_pages.h"
#include "softmax_divergence.h"
#include "softmax_kl.h"
#include "vec.h"

namespace kdfast {
namespace {

// Rows layout: row r's classes are contiguous.
template <typename scalar_t>
void softmax_kl_rows(const SoftmaxKLProblem& p, double scale) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  constexpr int64_t K = L::kStep;
  const ClassDimView &sv = p.view, &tv = p.t_view, &gv = p.grad_view;
  const int64_t V = sv.V, rows = sv.A * sv.I;
  const scalar_t* s = p.s.const_data_ptr<scalar_t>();
  const scalar_t* t = p.t.const_data_ptr<scalar_t>();
  scalar_t* grad = p.compute_grad ? p.grad.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* row_loss = p.row_loss.mutable_data_ptr<acc_t>();
  const int64_t* target = p.target.defined() ? p.target.const_data_ptr<int64_t>() : nullptr;
  const acc_t T = p.T, inv_T = acc_t(1) / T, alpha = p.alpha, beta = p.beta;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1));

  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    acc_t* es = scratch<acc_t>(2 * V);  // exp((s - M_s)/T), then exp((t - M_t)/T)
    acc_t* et = es + V;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t a = r / sv.I, i = r % sv.I;
      const scalar_t* sr = s + a * sv.stride_a + i * sv.stride_i;
      const scalar_t* tr = t + a * tv.stride_a + i * tv.stride_i;
      scalar_t* gr = grad ? grad + a * gv.stride_a + i * gv.stride_i : nullptr;
      const int64_t out = a * sv.row_stride_a + i * sv.row_stride_i;
      int64_t g = -1;  // DecoupledKD's target class, excluded from the sweeps
      if (target) {
        const int64_t label = target[out];
        if (label == p.ignore_index) {
          row_loss[out] = 0;
          if (gr) std::fill(gr, gr + V, scalar_t(0));
          continue;
        }
        if (p.decoupled) {
          KDFAST_CHECK(label >= 0 && label < V, "target ", label, " is out of range [0, ", V, ")");
          g = label;
        }
      }
      // The included classes: [0, V), or [0, g) and (g, V).
      const int64_t seg_begin[2] = {0, g + 1}, seg_end[2] = {g < 0 ? V : g, V};
      const int nseg = g < 0 ? 1 : 2;

      Vec vmax_s(neg_inf), vmax_t(neg_inf);
      for (int k = 0; k < nseg; ++k) {
        int64_t j = seg_begin[k];
        for (; j + K <= seg_end[k]; j += K) {
          vmax_s = at::vec::maximum(vmax_s, L::load(sr + j));
          vmax_t = at::vec::maximum(vmax_t, L::load(tr + j));
        }
        if (const int64_t n = seg_end[k] - j; n > 0) {
          vmax_s = at::vec::maximum(vmax_s, Vec::set(Vec(neg_inf), L::load(sr + j, n), n));
          vmax_t = at::vec::maximum(vmax_t, Vec::set(Vec(neg_inf), L::load(tr + j, n), n));
        }
      }
      SoftmaxKLRowStats<acc_t> st{};
      st.max_s = reduce_max(vmax_s);
      st.max_t = reduce_max(vmax_t);

      const Vec M_s(st.max_s), M_t(st.max_t), vinv_T(inv_T), zero(0);
      Vec sum_s(0), sum_t(0), cross(0);
      for (int k = 0; k < nseg; ++k) {
        for (int64_t j = seg_begin[k]; j < seg_end[k]; j += K) {
          const int64_t n = std::min(K, seg_end[k] - j);
          const Vec xs = L::load(sr + j, n), xt = L::load(tr + j, n);
          Vec e_s = ((xs - M_s) * vinv_T).exp(), e_t = ((xt - M_t) * vinv_T).exp();
          // Masked-out classes (e_t = 0, e.g. -inf logits) add nothing, not 0 * inf.
          Vec c = Vec::blendv(e_t * ((xt - xs) * vinv_T), zero, e_t == zero);
          if (n < K) {  // padding lanes
            e_s = Vec::set(zero, e_s, n);
            e_t = Vec::set(zero, e_t, n);
            c = Vec::set(zero, c, n);
          }
          e_s.store(es + j, n);
          e_t.store(et + j, n);
          sum_s = sum_s + e_s;
          sum_t = sum_t + e_t;
          cross = cross + c;
        }
      }
      st.sum_s = reduce_sum(sum_s);
      st.sum_t = reduce_sum(sum_t);
      st.cross = reduce_sum(cross);
      if (g >= 0) {
        st.s_g = static_cast<acc_t>(sr[g]);
        st.t_g = static_cast<acc_t>(tr[g]);
      }
      const auto res = softmax_kl_finish_row<acc_t>(st, T, p.decoupled, alpha, beta, scale);
      row_loss[out] = res.loss;
      if (!gr) continue;
      const Vec va(res.a), vb(res.b);
      for (int k = 0; k < nseg; ++k) {
        for (int64_t j = seg_begin[k]; j < seg_end[k]; j += K) {
          const int64_t n = std::min(K, seg_end[k] - j);
          L::store(gr + j, va * Vec::loadu(es + j, n) - vb * Vec::loadu(et + j, n), n);
        }
      }
      if (g >= 0) gr[g] = static_cast<scalar_t>(res.grad_g);
    }
  });
}

// Columns layout: neighbouring rows are contiguous (stride_i == 1), classes are strided,
// e.g. segmentation logits [B, C, H, W] with dim=1. A worker takes K neighbouring rows as
// the K lanes of a vector and walks their classes together.
template <typename scalar_t>
void softmax_kl_columns(const SoftmaxKLProblem& p, double scale) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  constexpr int64_t K = L::kStep;
  const ClassDimView &sv = p.view, &tv = p.t_view, &gv = p.grad_view;
  const int64_t V = sv.V, blocks_per_a = (sv.I + K - 1) / K;
  const scalar_t* s = p.s.const_data_ptr<scalar_t>();
  const scalar_t* t = p.t.const_data_ptr<scalar_t>();
  scalar_t* grad = p.compute_grad ? p.grad.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* row_loss = p.row_loss.mutable_data_ptr<acc_t>();
  const int64_t* target = p.target.defined() ? p.target.const_data_ptr<int64_t>() : nullptr;
  const acc_t T = p.T, inv_T = acc_t(1) / T, alpha = p.alpha, beta = p.beta;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(V, 1));

  at::parallel_for(0, sv.A * blocks_per_a, grain, [&](int64_t begin, int64_t end) {
    acc_t* es = scratch<acc_t>(2 * V * K);
    acc_t* et = es + V * K;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t a = blk / blocks_per_a, i0 = (blk % blocks_per_a) * K;
      const int64_t n = std::min(K, sv.I - i0);  // live lanes; the others compute garbage
      const scalar_t* sb = s + a * sv.stride_a + i0;
      const scalar_t* tb = t + a * tv.stride_a + i0;
      const int64_t out0 = a * sv.row_stride_a + i0 * sv.row_stride_i;
      acc_t lane_g[K], lane_ignored[K];
      for (int64_t l = 0; l < K; ++l) {
        lane_g[l] = -1;
        lane_ignored[l] = 0;
        if (!target || l >= n) continue;
        const int64_t label = target[out0 + l * sv.row_stride_i];
        if (label == p.ignore_index) {
          lane_ignored[l] = 1;
        } else if (p.decoupled) {
          KDFAST_CHECK(label >= 0 && label < V, "target ", label, " is out of range [0, ", V, ")");
          lane_g[l] = static_cast<acc_t>(label);
        }
      }
      const Vec vg = Vec::loadu(lane_g), ignored = Vec::loadu(lane_ignored) != Vec(0);
      const Vec zero(0), vneg_inf(neg_inf), vinv_T(inv_T);

      Vec vmax_s(neg_inf), vmax_t(neg_inf);
      for (int64_t j = 0; j < V; ++j) {
        const Vec is_g = vg == Vec(static_cast<acc_t>(j));
        vmax_s = at::vec::maximum(vmax_s, Vec::blendv(L::load(sb + j * sv.stride_v, n), vneg_inf, is_g));
        vmax_t = at::vec::maximum(vmax_t, Vec::blendv(L::load(tb + j * tv.stride_v, n), vneg_inf, is_g));
      }
      Vec sum_s(0), sum_t(0), cross(0);
      for (int64_t j = 0; j < V; ++j) {
        const Vec is_g = vg == Vec(static_cast<acc_t>(j));
        const Vec xs = L::load(sb + j * sv.stride_v, n), xt = L::load(tb + j * tv.stride_v, n);
        const Vec e_s = Vec::blendv(((xs - vmax_s) * vinv_T).exp(), zero, is_g);
        const Vec e_t = Vec::blendv(((xt - vmax_t) * vinv_T).exp(), zero, is_g);
        e_s.store(es + j * K);
        e_t.store(et + j * K);
        sum_s = sum_s + e_s;
        sum_t = sum_t + e_t;
        cross = cross + Vec::blendv(e_t * ((xt - xs) * vinv_T), zero, e_t == zero);
      }
      acc_t m_s[K], m_t[K], z_s[K], z_t[K], c[K], a_l[K], b_l[K], gg[K];
      vmax_s.store(m_s);
      vmax_t.store(m_t);
      sum_s.store(z_s);
      sum_t.store(z_t);
      cross.store(c);
      for (int64_t l = 0; l < K; ++l) {
        a_l[l] = b_l[l] = gg[l] = 0;
        if (l >= n) continue;
        if (lane_ignored[l] != 0) {
          row_loss[out0 + l * sv.row_stride_i] = 0;
          continue;
        }
        SoftmaxKLRowStats<acc_t> st{m_s[l], z_s[l], m_t[l], z_t[l], c[l], 0, 0};
        if (p.decoupled) {
          const int64_t g = static_cast<int64_t>(lane_g[l]);
          st.s_g = static_cast<acc_t>(sb[g * sv.stride_v + l]);
          st.t_g = static_cast<acc_t>(tb[g * tv.stride_v + l]);
        }
        const auto res = softmax_kl_finish_row<acc_t>(st, T, p.decoupled, alpha, beta, scale);
        row_loss[out0 + l * sv.row_stride_i] = res.loss;
        a_l[l] = res.a;
        b_l[l] = res.b;
        gg[l] = res.grad_g;
      }
      if (!grad) continue;
      scalar_t* gb = grad + a * gv.stride_a + i0;
      const Vec va = Vec::loadu(a_l), vb = Vec::loadu(b_l), vgg = Vec::loadu(gg);
      for (int64_t j = 0; j < V; ++j) {
        const Vec is_g = vg == Vec(static_cast<acc_t>(j));
        Vec out = va * Vec::loadu(es + j * K) - vb * Vec::loadu(et + j * K);
        out = Vec::blendv(Vec::blendv(out, vgg, is_g), zero, ignored);  // exact zeros, even for NaN input
        L::store(gb + j * gv.stride_v, out, n);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_cpu(const at::Tensor& s, const at::Tensor& t,
                                                  const std::optional<at::Tensor>& target,
                                                  const at::Tensor& scale, int64_t dim, double T,
                                                  int64_t ignore_index, double alpha, double beta,
                                                  bool decoupled, bool compute_grad, c10::string_view divergence,
                                                  double jsd_beta) {
  SoftmaxKLProblem p =
      prepare_softmax_kl(s, t, target, dim, T, ignore_index, alpha, beta, decoupled, compute_grad);
  set_divergence(p, divergence, jsd_beta);
  const double grad_scale = scale.item<double>();
  if (p.divergence != Divergence::ForwardKL) {
    softmax_divergence_cpu(p, grad_scale);
    return {p.row_loss, p.grad};
  }
  advise_huge_pages(p.grad);
  KDFAST_DISPATCH_FLOATING(p.s.scalar_type(), "softmax_kl_cpu", [&] {
    if (p.layout == KernelLayout::Rows) {
      softmax_kl_rows<scalar_t>(p, grad_scale);
    } else {
      softmax_kl_columns<scalar_t>(p, grad_scale);
    }
  });
  return {p.row_loss, p.grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast_C, CPU, m) { m.impl("softmax_kl", &softmax_kl_cpu); }

}  // namespace kdfast
