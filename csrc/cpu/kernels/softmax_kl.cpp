// Fused temperature-softmax KL on the CPU (math: softmax_kl_math.h), compiled once per
// instruction set (csrc/cpu/dispatch.h). The other divergences (reverse KL, JSD, TVD) and
// sparse teachers are in softmax_divergence.cpp; the table of entry points at the end of
// this file holds them all.
//
// Rows layout (a row's classes contiguous): one worker owns whole rows, three sweeps each:
//   1. the maxima of s and t (the row comes from memory, or from L2 when prefetched);
//   2. from the caches: y = (x - M) log2(e)/T and e = 2^y on both sides, the only two
//      exponentials per element (exp2_nonpositive, csrc/cpu/vec.h), kept in a per-thread
//      scratch row, and the sums Z_s, Z_t, cross; meanwhile the next row is prefetched into
//      L2, so that its trip from memory overlaps this row's arithmetic;
//   3. grad = a e_s - b e_t from the scratch row, with non-temporal stores when the
//      gradient outgrows the caches (no read of the lines it overwrites).
// Traffic: read s, read t, write grad: the minimum. Memory beyond the inputs and the
// gradient: O(rows) + 2 rows of scratch per thread. The gradient's memory is reused from
// call to call (csrc/cpu/memory.h): a fresh one would cost more page faults than compute.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/kernels/softmax_divergence.h"
#include "cpu/memory.h"
#include "cpu/vec.h"
#include "softmax_kl.h"

namespace kdfast {
inline namespace CPU_CAPABILITY {
namespace {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

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
  const acc_t T = p.T, alpha = p.alpha, beta = p.beta;
  const acc_t k = static_cast<acc_t>(kLog2e / p.T);  // y in log2 units: e = 2^((x - M) k)
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  // Chunks of ~512K classes (16 rows of 32k) taken by the threads in turn (parallel_chunks)
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 19) / std::max<int64_t>(V, 1));
  const bool stream = grad != nullptr && stream_stores(p.grad.nbytes(), at::get_num_threads());
  const int64_t padded = (V + K - 1) / K * K + K;  // whole vectors from any class on

  parallel_chunks(rows, chunk, [&](int64_t begin, int64_t end) {
    acc_t* es = scratch<acc_t>(2 * padded);  // 2^ys, then 2^yt
    acc_t* et = es + padded;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t a = r / sv.I, i = r % sv.I;
      const scalar_t* sr = s + a * sv.stride_a + i * sv.stride_i;
      const scalar_t* tr = t + a * tv.stride_a + i * tv.stride_i;
      scalar_t* gr = grad ? grad + a * gv.stride_a + i * gv.stride_i : nullptr;
      // The next row of this chunk, fetched into L2 during sweep 2 (nullptr: none).
      const int64_t an = (r + 1) / sv.I, in = (r + 1) % sv.I;
      const scalar_t* sn = r + 1 < end ? s + an * sv.stride_a + in * sv.stride_i : nullptr;
      const scalar_t* tn = r + 1 < end ? t + an * tv.stride_a + in * tv.stride_i : nullptr;
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

      // Sweep 1: maxima. A NaN may be dropped here: it still reaches the sums of sweep 2.
      Vec max_s0(neg_inf), max_s1(neg_inf), max_t0(neg_inf), max_t1(neg_inf);
      for (int seg = 0; seg < nseg; ++seg) {
        int64_t j = seg_begin[seg];
        for (; j + 2 * K <= seg_end[seg]; j += 2 * K) {
          max_s0 = max_dropping_nan(max_s0, L::load(sr + j));
          max_t0 = max_dropping_nan(max_t0, L::load(tr + j));
          max_s1 = max_dropping_nan(max_s1, L::load(sr + j + K));
          max_t1 = max_dropping_nan(max_t1, L::load(tr + j + K));
        }
        for (; j < seg_end[seg]; j += K) {
          const int64_t n = std::min(K, seg_end[seg] - j);
          max_s0 = max_dropping_nan(max_s0, Vec::set(Vec(neg_inf), L::load(sr + j, n), n));
          max_t0 = max_dropping_nan(max_t0, Vec::set(Vec(neg_inf), L::load(tr + j, n), n));
        }
      }
      SoftmaxKLRowStats<acc_t> st{};
      st.max_s = reduce_max(max_dropping_nan(max_s0, max_s1));
      st.max_t = reduce_max(max_dropping_nan(max_t0, max_t1));

      // Sweep 2: both sides centred on their maxima, their exponentials and the sums.
      // y = x k - M k in one FMA (exact product, one rounding): the rounding of M k shifts
      // a whole side by one constant, which cancels in its softmax and in the loss.
      // y = (x - M) k instead where M k overflows (|logits| near the float maximum), and for
      // DecoupledKD, whose target logit is centred on M exactly (softmax_kl_finish_row).
      const Vec vk(k), zero(0);
      Vec sum_s(0), sum_t(0), cross(0);
      const auto sweep2 = [&](auto centre) {
        for (int seg = 0; seg < nseg; ++seg) {
          for (int64_t j = seg_begin[seg]; j < seg_end[seg]; j += K) {
            if (sn != nullptr) {
              prefetch_l2(sn + j);
              prefetch_l2(tn + j);
            }
            const int64_t n = std::min(K, seg_end[seg] - j);
            const Vec ys = centre(L::load(sr + j, n), true), yt = centre(L::load(tr + j, n), false);
            Vec e_s = exp2_nonpositive(ys), e_t = exp2_nonpositive(yt);
            if (n < K) {  // padding lanes
              e_s = Vec::set(zero, e_s, n);
              e_t = Vec::set(zero, e_t, n);
            }
            e_s.store(es + j);
            e_t.store(et + j);
            sum_s = sum_s + e_s;
            sum_t = sum_t + e_t;
            cross = fma_where_nonzero(e_t, yt - ys, cross);  // classes of probability 0 add nothing
          }
        }
      };
      const acc_t mk_s = st.max_s * k, mk_t = st.max_t * k;
      if (!p.decoupled && std::isfinite(mk_s) && std::isfinite(mk_t)) {
        const Vec neg_mk_s(-mk_s), neg_mk_t(-mk_t);
        sweep2([&](const Vec& x, bool student) { return at::vec::fmadd(x, vk, student ? neg_mk_s : neg_mk_t); });
      } else {
        const Vec M_s(st.max_s), M_t(st.max_t);
        sweep2([&](const Vec& x, bool student) { return (x - (student ? M_s : M_t)) * vk; });
      }
      st.sum_s = reduce_sum(sum_s);
      st.sum_t = reduce_sum(sum_t);
      st.cross = reduce_sum(cross) * static_cast<acc_t>(kLn2);  // log2 units to nats
      if (g >= 0) {
        st.s_g = static_cast<acc_t>(sr[g]);
        st.t_g = static_cast<acc_t>(tr[g]);
      }
      const auto res = softmax_kl_finish_row<acc_t>(st, T, p.decoupled, alpha, beta, scale);
      row_loss[out] = res.loss;
      if (!gr) continue;

      // Sweep 3: the gradient.
      const Vec va(res.a), vb(res.b);
      for (int seg = 0; seg < nseg; ++seg) {
        for (int64_t j = seg_begin[seg]; j < seg_end[seg]; j += K) {
          const int64_t n = std::min(K, seg_end[seg] - j);
          const Vec value = va * Vec::loadu(es + j) - vb * Vec::loadu(et + j);
          if (stream && n == K) {
            L::store_stream(gr + j, value);
          } else {
            L::store(gr + j, value, n);
          }
        }
      }
      if (g >= 0) gr[g] = static_cast<scalar_t>(res.grad_g);
    }
    if (stream) stream_fence();
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
  const acc_t T = p.T, alpha = p.alpha, beta = p.beta;
  const acc_t k = static_cast<acc_t>(kLog2e / p.T);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 16) / (K * std::max<int64_t>(V, 1)));

  parallel_chunks(sv.A * blocks_per_a, chunk, [&](int64_t begin, int64_t end) {
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
      const Vec zero(0), vneg_inf(neg_inf), vk(k);

      Vec vmax_s(neg_inf), vmax_t(neg_inf);
      for (int64_t j = 0; j < V; ++j) {
        const Vec is_g = vg == Vec(static_cast<acc_t>(j));
        vmax_s = at::vec::maximum(vmax_s, Vec::blendv(L::load(sb + j * sv.stride_v, n), vneg_inf, is_g));
        vmax_t = at::vec::maximum(vmax_t, Vec::blendv(L::load(tb + j * tv.stride_v, n), vneg_inf, is_g));
      }
      Vec sum_s(0), sum_t(0), cross(0);
      for (int64_t j = 0; j < V; ++j) {
        const Vec is_g = vg == Vec(static_cast<acc_t>(j));
        const Vec ys = (L::load(sb + j * sv.stride_v, n) - vmax_s) * vk;
        const Vec yt = (L::load(tb + j * tv.stride_v, n) - vmax_t) * vk;
        const Vec e_s = Vec::blendv(exp2_nonpositive(ys), zero, is_g);
        const Vec e_t = Vec::blendv(exp2_nonpositive(yt), zero, is_g);
        e_s.store(es + j * K);
        e_t.store(et + j * K);
        sum_s = sum_s + e_s;
        sum_t = sum_t + e_t;
        cross = fma_where_nonzero(e_t, yt - ys, cross);
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
        SoftmaxKLRowStats<acc_t> st{m_s[l], z_s[l], m_t[l], z_t[l], c[l] * static_cast<acc_t>(kLn2), 0, 0};
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

// y = exp(x) over `x` (float32, values <= 0), `repeats` times, split between the threads.
template <typename Exp>
at::Tensor exp_over(const at::Tensor& x, int64_t repeats, const Exp& exp) {
  using Vec = Vectorized<float>;
  constexpr int64_t K = Vec::size();
  at::Tensor y = at::empty_like(x);
  const float* in = x.const_data_ptr<float>();
  float* out = y.mutable_data_ptr<float>();
  const int64_t n = x.numel();
  const int64_t grain = std::max<int64_t>(K, n / std::max(1, at::get_num_threads()));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t rep = 0; rep < repeats; ++rep) {
      for (int64_t j = begin; j < end; j += K) {
        const int64_t m = std::min(K, end - j);
        exp(Vec::loadu(in + j, m)).store(out + j, m);
      }
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_cpu(const at::Tensor& s, const at::Tensor& t,
                                                  const std::optional<at::Tensor>& target,
                                                  const at::Tensor& scale, int64_t dim, double T,
                                                  int64_t ignore_index, double alpha, double beta,
                                                  bool decoupled, bool compute_grad, c10::string_view divergence,
                                                  double jsd_beta) {
  SoftmaxKLProblem p = prepare_softmax_kl(s, t, target, dim, T, ignore_index, alpha, beta, decoupled,
                                          compute_grad, &empty_like_reused);
  set_divergence(p, divergence, jsd_beta);
  const double grad_scale = scale.item<double>();
  if (p.divergence != Divergence::ForwardKL) {
    softmax_divergence_cpu(p, grad_scale);
    return {p.row_loss, p.grad};
  }
  KDFAST_DISPATCH_FLOATING(p.s.scalar_type(), "softmax_kl_cpu", [&] {
    if (p.layout == KernelLayout::Rows) {
      softmax_kl_rows<scalar_t>(p, grad_scale);
    } else {
      softmax_kl_columns<scalar_t>(p, grad_scale);
    }
  });
  return {p.row_loss, p.grad};
}

at::Tensor cpu_exp(const at::Tensor& x, c10::string_view impl, int64_t repeats) {
  KDFAST_CHECK(x.is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
               "cpu_exp: x must be a contiguous float32 CPU tensor, got ", x.scalar_type(), " ", x.sizes());
  KDFAST_CHECK(repeats >= 1, "cpu_exp: repeats must be >= 1, got ", repeats);
  using Vec = Vectorized<float>;
  if (impl == "kernel") {
    const Vec log2e(static_cast<float>(kLog2e));
    return exp_over(x, repeats, [&](const Vec& v) { return exp2_nonpositive(v * log2e); });
  }
  KDFAST_CHECK(impl == "sleef", "cpu_exp: impl must be 'kernel' or 'sleef', got '", std::string(impl), "'");
  return exp_over(x, repeats, [](const Vec& v) { return v.exp(); });
}

}  // namespace

extern const SoftmaxKLKernels kSoftmaxKLKernels;
const SoftmaxKLKernels kSoftmaxKLKernels{&softmax_kl_cpu, &softmax_kl_topk_cpu, &cpu_exp};

}  // namespace CPU_CAPABILITY
}  // namespace kdfast
