// Fused temperature-softmax divergences on the CPU, dense teachers (math: softmax_kl_math.h):
// forward KL (and DecoupledKD), reverse KL, JSD and TVD, one kernel per layout, compiled
// once per divergence (kDiv) and once per instruction set (csrc/cpu/dispatch.h). Sparse
// teachers are in softmax_kl_topk.cpp; the table of entry points at the end of this file
// holds them all.
//
// Rows layout (a row's classes contiguous): one worker owns whole rows, three or four sweeps:
//   1. the maxima of s and t (the row comes from memory, or from L2 when prefetched); the
//      divergences other than forward KL also t_a, the teacher's logit at the student's
//      argmax (the anchor of their gradient, divergence_weight);
//   2. from the caches: y = (x - M) log2(e)/T and e = 2^y on both sides, the only two
//      exponentials per element (exp2_nonpositive, csrc/cpu/vec.h), kept in a per-thread
//      scratch row, and the sums Z_s, Z_t; forward KL the cross sum of e^yt (yt - ys),
//      reverse KL the anchored cross sum of e^ys d (keeping d instead of e^yt); meanwhile
//      the next row is prefetched into L2, so that its trip from memory overlaps this row's
//      arithmetic;
//   3. JSD, TVD only: the loss and W from divergence_terms / divergence_weight, w kept;
//   4. the gradient from the scratch row, with non-temporal stores when the gradient
//      outgrows the caches (no read of the lines it overwrites):
//        forward KL  a e^ys - b e^yt           (softmax_kl_finish_row)
//        reverse KL  a e^ys (d - b)            (reverse_kl_finish_row)
//        JSD, TVD    a (w - q W)               (divergence_weight)
// Traffic: read s, read t, write grad: the minimum. Memory beyond the inputs and the
// gradient: O(rows) + 2 rows of scratch per thread. The gradient's memory is reused from
// call to call (csrc/cpu/memory.h): a fresh one would cost more page faults than compute.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/kernels/softmax_kl_topk.h"
#include "cpu/memory.h"
#include "cpu/vec.h"
#include "softmax_kl.h"

namespace kdfast {
inline namespace CPU_CAPABILITY {
namespace {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// A row's constants after its statistics (sweep 2), for sweeps 3 and 4.
template <typename acc_t>
struct RowFinish {
  acc_t loss;        // reverse KL, forward KL: the row loss; JSD, TVD: set by sweep 3
  acc_t a, b;        // the gradient's constants (see the file comment); JSD, TVD: b = W
  acc_t grad_g = 0;  // DecoupledKD: the gradient at the target class
  acc_t inv_z_s = 0, inv_z_t = 0, log_ratio = 0, h_a = 0;  // JSD, TVD: sweep 3's inputs
  bool nan = false;  // x/T overflows: loss and gradient NaN (forward KL: in a, b already)
};

// From a row's statistics: M (maxima), t_a (the anchor), Z (sums), cross (forward KL: in
// log2 units, reverse KL: in nats); s_g, t_g: DecoupledKD's target logits.
template <Divergence kDiv, typename acc_t>
RowFinish<acc_t> finish_row(const SoftmaxKLProblem& p, acc_t m_s, acc_t m_t, acc_t t_a, acc_t z_s, acc_t z_t,
                            acc_t cross, acc_t s_g, acc_t t_g, acc_t scale) {
  const acc_t T = p.T, inv_T = acc_t(1) / T;
  RowFinish<acc_t> r{};
  if constexpr (kDiv == Divergence::ForwardKL) {
    const SoftmaxKLRowStats<acc_t> st{m_s, z_s, m_t, z_t, cross * static_cast<acc_t>(kLn2), s_g, t_g};
    const auto res = softmax_kl_finish_row<acc_t>(st, T, p.decoupled, p.alpha, p.beta, scale);
    r.loss = res.loss;
    r.a = res.a;
    r.b = res.b;
    r.grad_g = res.grad_g;
    return r;
  }
  r.nan = softmax_kl_overflows(m_s, inv_T) || softmax_kl_overflows(m_t, inv_T);
  if constexpr (kDiv == Divergence::ReverseKL) {
    const ReverseKLRow<acc_t> row = reverse_kl_finish_row<acc_t>(z_s, z_t, cross, m_t, t_a, T, scale);
    r.loss = row.loss;
    r.a = row.a;
    r.b = row.b;
  } else {
    const acc_t beta = p.jsd_beta;
    r.inv_z_s = acc_t(1) / z_s;
    r.inv_z_t = acc_t(1) / z_t;
    r.log_ratio = std::log(z_s) - std::log(z_t);
    r.a = divergence_grad_scale(kDiv, T) * scale;
    const acc_t ls_a = -std::log(z_s), lt_a = (t_a - m_t) * inv_T - std::log(z_t);
    r.h_a = divergence_terms<ScalarOps<acc_t>>(kDiv, lt_a - ls_a, std::exp(ls_a), std::exp(lt_a), beta,
                                               acc_t(1) - beta)
                .h;
  }
  return r;
}

// Sweep 1's running maxima: forward KL the maxima alone (a NaN never becomes one: it
// reaches the sums); the others also the teacher's logit where the student's maximum is.
template <Divergence kDiv, typename Vec>
inline void track_max(Vec& max_s, Vec& max_t, Vec& anchor_t, const Vec& xs, const Vec& xt) {
  if constexpr (kDiv == Divergence::ForwardKL) {
    max_s = max_dropping_nan(max_s, xs);
    max_t = max_dropping_nan(max_t, xt);
  } else {
    const Vec above = xs > max_s;
    max_s = Vec::blendv(max_s, xs, above);
    anchor_t = Vec::blendv(anchor_t, xt, above);
    max_t = Vec::blendv(max_t, xt, xt > max_t);
  }
}

// Sweep 2's per-class work on centred y (log2 units): e^ys into es, e^yt (reverse KL: d)
// into et, the sums and cross. xs, xt: the raw logits (reverse KL's d).
template <Divergence kDiv, typename Vec>
inline void sweep2_step(const Vec& xs, const Vec& xt, const Vec& ys, const Vec& yt, int64_t n, const Vec& vms,
                        const Vec& vta, const Vec& vinv_T, typename Vec::value_type* es_j,
                        typename Vec::value_type* et_j, Vec& sum_s, Vec& sum_t, Vec& cross) {
  const Vec zero(0);
  Vec e_s = exp2_nonpositive(ys), e_t = exp2_nonpositive(yt);
  if (n < Vec::size()) {  // padding lanes
    e_s = Vec::set(zero, e_s, n);
    e_t = Vec::set(zero, e_t, n);
  }
  e_s.store(es_j);
  sum_s = sum_s + e_s;
  sum_t = sum_t + e_t;
  if constexpr (kDiv == Divergence::ForwardKL) {
    e_t.store(et_j);
    cross = fma_where_nonzero(e_t, yt - ys, cross);  // classes of probability 0 add nothing
  } else if constexpr (kDiv == Divergence::ReverseKL) {
    const Vec d = ((xs - vms) - (xt - vta)) * vinv_T;
    cross = cross + Vec::blendv(zero, e_s * d, e_s > zero);
    d.store(et_j);
  } else {
    e_t.store(et_j);
  }
}

// Sweep 3 (JSD, TVD): a class's loss term and w (into et) from e^ys (es), e^yt (et) and the
// raw logits; returns w.
template <Divergence kDiv, typename Vec>
inline Vec loss_step(const Vec& xs, const Vec& xt, const Vec& vms, const Vec& vmt, const Vec& vinv_T,
                     const Vec& izs, const Vec& izt, const Vec& lr, const Vec& vh_a, const Vec& vbeta,
                     const Vec& v1mb, typename Vec::value_type* es_j, typename Vec::value_type* et_j,
                     Vec& loss) {
  using Ops = VecOps<typename Vec::value_type>;
  const Vec ps = Vec::loadu(es_j) * izs, pt = Vec::loadu(et_j) * izt;
  const Vec d = ((xt - vmt) - (xs - vms)) * vinv_T + lr;
  const ClassTerms<Vec> c = divergence_terms<Ops>(kDiv, d, ps, pt, vbeta, v1mb);
  loss = loss + c.loss;
  return divergence_weight<Ops>(kDiv, c, ps, vh_a);
}

// Sweep 4: a class's gradient from the scratch (see the file comment); vqb = a W / Z_s.
template <Divergence kDiv, typename Vec>
inline Vec grad_step(const Vec& e_s, const Vec& x, const Vec& va, const Vec& vb, const Vec& vqb) {
  if constexpr (kDiv == Divergence::ForwardKL) {
    return va * e_s - vb * x;
  } else if constexpr (kDiv == Divergence::ReverseKL) {
    return Vec::blendv(Vec(0), va * e_s * (x - vb), e_s > Vec(0));
  } else {
    return va * x - vqb * e_s;
  }
}

// Rows layout: row r's classes are contiguous.
template <typename scalar_t, Divergence kDiv>
void softmax_kl_rows(const SoftmaxKLProblem& p, double scale_d) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  constexpr int64_t K = L::kStep;
  constexpr bool kFKL = kDiv == Divergence::ForwardKL, kLossSweep = kDiv == Divergence::JSD || kDiv == Divergence::TVD;
  const ClassDimView &sv = p.view, &tv = p.t_view, &gv = p.grad_view;
  const int64_t V = sv.V, rows = sv.A * sv.I;
  const scalar_t* s = p.s.const_data_ptr<scalar_t>();
  const scalar_t* t = p.t.const_data_ptr<scalar_t>();
  scalar_t* grad = p.compute_grad ? p.grad.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* row_loss = p.row_loss.mutable_data_ptr<acc_t>();
  const int64_t* target = p.target.defined() ? p.target.const_data_ptr<int64_t>() : nullptr;
  const bool decoupled = kFKL && p.decoupled;
  const acc_t T = p.T, inv_T = acc_t(1) / T, scale = scale_d, beta = p.jsd_beta;
  const acc_t k = static_cast<acc_t>(kLog2e / p.T);  // y in log2 units: e = 2^((x - M) k)
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  // Chunks of ~512K classes (16 rows of 32k) taken by the threads in turn (parallel_chunks)
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 19) / std::max<int64_t>(V, 1));
  const bool stream = grad != nullptr && stream_stores(p.grad.nbytes(), at::get_num_threads());
  const int64_t padded = (V + K - 1) / K * K + K;  // whole vectors from any class on

  parallel_chunks(rows, chunk, [&](int64_t begin, int64_t end) {
    acc_t* es = scratch<acc_t>(2 * padded);  // 2^ys, then 2^yt (reverse KL: d; JSD, TVD: then w)
    acc_t* et = es + padded;
    const Vec zero(0), vneg_inf(neg_inf), vk(k), vinv_T(inv_T);
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
        if (decoupled) {
          KDFAST_CHECK(label >= 0 && label < V, "target ", label, " is out of range [0, ", V, ")");
          g = label;
        }
      }
      // The included classes: [0, V), or [0, g) and (g, V).
      const int64_t seg_begin[2] = {0, g + 1}, seg_end[2] = {g < 0 ? V : g, V};
      const int nseg = g < 0 ? 1 : 2;

      // Sweep 1: maxima (and the anchor), two vectors at a time.
      Vec max_s0(neg_inf), max_s1(neg_inf), max_t0(neg_inf), max_t1(neg_inf), anchor0(0), anchor1(0);
      for (int seg = 0; seg < nseg; ++seg) {
        int64_t j = seg_begin[seg];
        for (; j + 2 * K <= seg_end[seg]; j += 2 * K) {
          track_max<kDiv>(max_s0, max_t0, anchor0, L::load(sr + j), L::load(tr + j));
          track_max<kDiv>(max_s1, max_t1, anchor1, L::load(sr + j + K), L::load(tr + j + K));
        }
        for (; j < seg_end[seg]; j += K) {
          const int64_t n = std::min(K, seg_end[seg] - j);
          track_max<kDiv>(max_s0, max_t0, anchor0, Vec::set(vneg_inf, L::load(sr + j, n), n),
                          Vec::set(vneg_inf, L::load(tr + j, n), n));
        }
      }
      const acc_t m_t = reduce_max(max_dropping_nan(max_t0, max_t1));
      acc_t m_s, t_a = 0;
      if constexpr (kFKL) {
        m_s = reduce_max(max_dropping_nan(max_s0, max_s1));
      } else {  // the lane of the largest maximum (the first of equals) and its anchor
        const Vec above = max_s1 > max_s0;
        acc_t lanes_s[K], lanes_a[K];
        Vec::blendv(max_s0, max_s1, above).store(lanes_s);
        Vec::blendv(anchor0, anchor1, above).store(lanes_a);
        m_s = lanes_s[0];
        t_a = lanes_a[0];
        for (int64_t l = 1; l < K; ++l) {
          if (lanes_s[l] > m_s) {
            m_s = lanes_s[l];
            t_a = lanes_a[l];
          }
        }
      }

      // Sweep 2: both sides centred on their maxima, their exponentials and the sums.
      // y = x k - M k in one FMA (exact product, one rounding): the rounding of M k shifts
      // a whole side by one constant, which cancels in its softmax and in the loss.
      // y = (x - M) k instead where M k overflows (|logits| near the float maximum), for
      // DecoupledKD, whose target logit is centred on M exactly (softmax_kl_finish_row), and
      // for the other divergences, whose log Z_s - log Z_t meets gaps of the raw logits (the
      // two sides' shifts would not cancel there). Those centre a side of -inf on 0.
      const acc_t ref_s = !kFKL && m_s == neg_inf ? acc_t(0) : m_s;
      const acc_t ref_t = !kFKL && m_t == neg_inf ? acc_t(0) : m_t;
      const Vec vms(ref_s), vmt(ref_t), vta(t_a);
      Vec sum_s(0), sum_t(0), cross(0);
      const auto sweep2 = [&](auto centre) {
        for (int seg = 0; seg < nseg; ++seg) {
          for (int64_t j = seg_begin[seg]; j < seg_end[seg]; j += K) {
            if (sn != nullptr) {
              prefetch_l2(sn + j);
              prefetch_l2(tn + j);
            }
            const int64_t n = std::min(K, seg_end[seg] - j);
            const Vec xs = L::load(sr + j, n), xt = L::load(tr + j, n);
            sweep2_step<kDiv>(xs, xt, centre(xs, true), centre(xt, false), n, vms, vta, vinv_T, es + j, et + j,
                              sum_s, sum_t, cross);
          }
        }
      };
      const acc_t mk_s = ref_s * k, mk_t = ref_t * k;
      if (kFKL && !decoupled && std::isfinite(mk_s) && std::isfinite(mk_t)) {
        const Vec neg_mk_s(-mk_s), neg_mk_t(-mk_t);
        sweep2([&](const Vec& x, bool student) { return at::vec::fmadd(x, vk, student ? neg_mk_s : neg_mk_t); });
      } else {
        sweep2([&](const Vec& x, bool student) { return (x - (student ? vms : vmt)) * vk; });
      }
      const acc_t s_g = g >= 0 ? static_cast<acc_t>(sr[g]) : acc_t(0);
      const acc_t t_g = g >= 0 ? static_cast<acc_t>(tr[g]) : acc_t(0);
      RowFinish<acc_t> fin = finish_row<kDiv>(p, m_s, m_t, t_a, reduce_sum(sum_s), reduce_sum(sum_t),
                                              reduce_sum(cross), s_g, t_g, scale);

      if constexpr (kLossSweep) {  // Sweep 3: the loss and W; w replaces e^yt.
        const Vec izs(fin.inv_z_s), izt(fin.inv_z_t), lr(fin.log_ratio), vh_a(fin.h_a), vbeta(beta),
            v1mb(acc_t(1) - beta);
        Vec loss(0), total_w(0);
        for (int64_t j = 0; j < V; j += K) {
          const int64_t n = std::min(K, V - j);
          Vec part(0);
          const Vec w = Vec::set(zero, loss_step<kDiv>(L::load(sr + j, n), L::load(tr + j, n), vms, vmt, vinv_T, izs, izt, lr, vh_a, vbeta, v1mb, es + j, et + j, part),
                                 n);
          loss = loss + Vec::set(zero, part, n);
          total_w = total_w + w;
          w.store(et + j);
        }
        fin.loss = divergence_loss_scale(kDiv, T) * reduce_sum(loss);
        fin.b = reduce_sum(total_w);
      }
      row_loss[out] = fin.nan ? nan : fin.loss;
      if (!gr) continue;
      if (fin.nan) {
        std::fill(gr, gr + V, static_cast<scalar_t>(nan));
        continue;
      }

      // Sweep 4: the gradient.
      const Vec va(fin.a), vb(fin.b), vqb(fin.a * fin.b * fin.inv_z_s);
      for (int seg = 0; seg < nseg; ++seg) {
        for (int64_t j = seg_begin[seg]; j < seg_end[seg]; j += K) {
          const int64_t n = std::min(K, seg_end[seg] - j);
          const Vec value = grad_step<kDiv>(Vec::loadu(es + j), Vec::loadu(et + j), va, vb, vqb);
          if (stream && n == K) {
            L::store_stream(gr + j, value);
          } else {
            L::store(gr + j, value, n);
          }
        }
      }
      if (g >= 0) gr[g] = static_cast<scalar_t>(fin.grad_g);
    }
    if (stream) stream_fence();
  });
}

// Columns layout: neighbouring rows are contiguous (stride_i == 1), classes are strided,
// e.g. segmentation logits [B, C, H, W] with dim=1. A worker takes K neighbouring rows as
// the K lanes of a vector and walks their classes together, the sweeps of the rows layout
// per lane.
template <typename scalar_t, Divergence kDiv>
void softmax_kl_columns(const SoftmaxKLProblem& p, double scale_d) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  constexpr int64_t K = L::kStep;
  constexpr bool kFKL = kDiv == Divergence::ForwardKL, kLossSweep = kDiv == Divergence::JSD || kDiv == Divergence::TVD;
  const ClassDimView &sv = p.view, &tv = p.t_view, &gv = p.grad_view;
  const int64_t V = sv.V, blocks_per_a = (sv.I + K - 1) / K;
  const scalar_t* s = p.s.const_data_ptr<scalar_t>();
  const scalar_t* t = p.t.const_data_ptr<scalar_t>();
  scalar_t* grad = p.compute_grad ? p.grad.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* row_loss = p.row_loss.mutable_data_ptr<acc_t>();
  const int64_t* target = p.target.defined() ? p.target.const_data_ptr<int64_t>() : nullptr;
  const bool decoupled = kFKL && p.decoupled;
  const acc_t T = p.T, inv_T = acc_t(1) / T, scale = scale_d, beta = p.jsd_beta;
  const acc_t k = static_cast<acc_t>(kLog2e / p.T);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 16) / (K * std::max<int64_t>(V, 1)));

  parallel_chunks(sv.A * blocks_per_a, chunk, [&](int64_t begin, int64_t end) {
    acc_t* es = scratch<acc_t>(2 * V * K);
    acc_t* et = es + V * K;
    const Vec zero(0), vneg_inf(neg_inf), vk(k), vinv_T(inv_T);
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
        } else if (decoupled) {
          KDFAST_CHECK(label >= 0 && label < V, "target ", label, " is out of range [0, ", V, ")");
          lane_g[l] = static_cast<acc_t>(label);
        }
      }
      const Vec vg = Vec::loadu(lane_g), ignored = Vec::loadu(lane_ignored) != zero;
      // A class's logits with DecoupledKD's target class at -inf (probability 0).
      const auto load = [&](int64_t j) {
        const Vec is_g = vg == Vec(static_cast<acc_t>(j));
        return std::pair<Vec, Vec>{Vec::blendv(L::load(sb + j * sv.stride_v, n), vneg_inf, is_g),
                                   Vec::blendv(L::load(tb + j * tv.stride_v, n), vneg_inf, is_g)};
      };

      Vec max_s(neg_inf), max_t(neg_inf), anchor_t(0);
      for (int64_t j = 0; j < V; ++j) {
        const auto [xs, xt] = load(j);
        track_max<kDiv>(max_s, max_t, anchor_t, xs, xt);
      }
      const Vec vms = kFKL ? max_s : Vec::blendv(max_s, zero, max_s == vneg_inf);
      const Vec vmt = kFKL ? max_t : Vec::blendv(max_t, zero, max_t == vneg_inf);
      Vec sum_s(0), sum_t(0), cross(0);
      for (int64_t j = 0; j < V; ++j) {
        const auto [xs, xt] = load(j);
        sweep2_step<kDiv>(xs, xt, (xs - vms) * vk, (xt - vmt) * vk, K, vms, anchor_t, vinv_T, es + j * K,
                          et + j * K, sum_s, sum_t, cross);
      }
      acc_t m_s[K], m_t[K], t_a[K], z_s[K], z_t[K], c[K];
      max_s.store(m_s);
      max_t.store(m_t);
      anchor_t.store(t_a);
      sum_s.store(z_s);
      sum_t.store(z_t);
      cross.store(c);
      RowFinish<acc_t> lane[K];
      acc_t a_l[K], b_l[K], gg[K], izs[K], izt[K], lr[K], h_a[K], nan_l[K];
      for (int64_t l = 0; l < K; ++l) {
        const int64_t g = decoupled && l < n ? static_cast<int64_t>(lane_g[l]) : -1;
        const acc_t s_g = g >= 0 ? static_cast<acc_t>(sb[g * sv.stride_v + l]) : acc_t(0);
        const acc_t t_g = g >= 0 ? static_cast<acc_t>(tb[g * tv.stride_v + l]) : acc_t(0);
        lane[l] = finish_row<kDiv>(p, m_s[l], m_t[l], t_a[l], z_s[l], z_t[l], c[l], s_g, t_g, scale);
        a_l[l] = lane[l].a;
        b_l[l] = lane[l].b;
        gg[l] = lane[l].grad_g;
        izs[l] = lane[l].inv_z_s;
        izt[l] = lane[l].inv_z_t;
        lr[l] = lane[l].log_ratio;
        h_a[l] = lane[l].h_a;
        nan_l[l] = lane[l].nan ? 1 : 0;
      }
      const Vec vizs = Vec::loadu(izs);
      if constexpr (kLossSweep) {
        const Vec vizt = Vec::loadu(izt), vlr = Vec::loadu(lr), vh_a = Vec::loadu(h_a), vbeta(beta),
                  v1mb(acc_t(1) - beta);
        Vec loss(0), total_w(0);
        for (int64_t j = 0; j < V; ++j) {
          const auto [xs, xt] = load(j);
          const Vec w = loss_step<kDiv>(xs, xt, vms, vmt, vinv_T, vizs, vizt, vlr, vh_a, vbeta, v1mb, es + j * K,
                                        et + j * K, loss);
          total_w = total_w + w;
          w.store(et + j * K);
        }
        acc_t loss_l[K];
        loss.store(loss_l);
        total_w.store(b_l);
        for (int64_t l = 0; l < K; ++l) lane[l].loss = divergence_loss_scale(kDiv, T) * loss_l[l];
      }
      for (int64_t l = 0; l < n; ++l) {
        row_loss[out0 + l * sv.row_stride_i] = lane_ignored[l] != 0 ? acc_t(0) : lane[l].nan ? nan
                                                                                             : lane[l].loss;
      }
      if (!grad) continue;
      scalar_t* gb = grad + a * gv.stride_a + i0;
      const Vec va = Vec::loadu(a_l), vb = Vec::loadu(b_l), vqb = va * vb * vizs, vgg = Vec::loadu(gg);
      const Vec bad = Vec::loadu(nan_l) != zero;
      for (int64_t j = 0; j < V; ++j) {
        const Vec is_g = vg == Vec(static_cast<acc_t>(j));
        Vec value = grad_step<kDiv>(Vec::loadu(es + j * K), Vec::loadu(et + j * K), va, vb, vqb);
        value = Vec::blendv(Vec::blendv(value, vgg, is_g), Vec(nan), bad);
        value = Vec::blendv(value, zero, ignored);  // exact zeros, even for NaN input
        L::store(gb + j * gv.stride_v, value, n);
      }
    }
  });
}

template <typename scalar_t>
void softmax_kl_dense(const SoftmaxKLProblem& p, double scale) {
  const auto run = [&](auto div) {
    constexpr Divergence kDiv = decltype(div)::value;
    if (p.layout == KernelLayout::Rows) {
      softmax_kl_rows<scalar_t, kDiv>(p, scale);
    } else {
      softmax_kl_columns<scalar_t, kDiv>(p, scale);
    }
  };
  switch (p.divergence) {
    case Divergence::ForwardKL:
      return run(std::integral_constant<Divergence, Divergence::ForwardKL>{});
    case Divergence::ReverseKL:
      return run(std::integral_constant<Divergence, Divergence::ReverseKL>{});
    case Divergence::JSD:
      return run(std::integral_constant<Divergence, Divergence::JSD>{});
    case Divergence::TVD:
      return run(std::integral_constant<Divergence, Divergence::TVD>{});
  }
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
  KDFAST_DISPATCH_FLOATING(p.s.scalar_type(), "softmax_kl_cpu", [&] { softmax_kl_dense<scalar_t>(p, grad_scale); });
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
