// Reverse KL, generalized JSD and TVD, dense or against a sparse (top-k) teacher, on the
// CPU (math: csrc/softmax_kl_math.h, "The LLM divergences"), compiled once per instruction
// set (csrc/cpu/dispatch.h).
//
// Dense rows (a row's classes contiguous), one worker per row, sweeps over the row, the
// later ones from L2 (a row of 32k fp32 logits is 128 KB a side) and a per-thread scratch:
//   1. the maxima of s and t and t_a, the teacher's logit at the student's argmax (the
//      anchor of the gradient, divergence_weight);
//   2. e^ys = exp((s - M_s)/T) = 2^((s - M_s) log2(e)/T) (exp2_nonpositive, csrc/cpu/vec.h:
//      every argument is centred, <= 0) and e^yt into the scratch, the sums Z_s, Z_t; reverse KL also
//      its anchored cross (and keeps d = ((s - s_a) - (t - t_a))/T instead of e^yt);
//   3. JSD, TVD: the loss and W from divergence_terms / divergence_weight, w kept;
//   4. the gradient from the scratch.
// Traffic from memory: read s, read t, write grad. The columns layout ([B, C, H, W] with
// dim=1) takes K neighbouring rows as the lanes of a vector and walks their classes.
// Sparse teachers: the teacher's k entries; the student row in one sweep (bucket: centred
// on the maximum over K, its exponentials, Z and the tail's sum through a mask of the row's
// top-k classes; renormalize: only its k entries), and the gradient from the scratch row;
// O(rows) memory beyond the inputs and the gradient, a scratch row and the mask per thread.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/kernels/softmax_divergence.h"
#include "cpu/memory.h"
#include "cpu/vec.h"

namespace kdfast {
inline namespace CPU_CAPABILITY {
namespace {

constexpr double kLog2e = 1.4426950408889634;

// A row's constants after its statistics (per lane in the columns layout).
template <typename acc_t>
struct DivRow {
  acc_t loss_part;  // reverse KL: the loss; JSD, TVD: set by the loss sweep
  acc_t a, b;       // reverse KL: grad = a e^ys (d - b); JSD, TVD: grad = a (w - q b), b = W
  acc_t inv_z_s, inv_z_t, log_ratio, h_a;
  bool nan;
};

template <typename acc_t>
DivRow<acc_t> finish_stats(Divergence div, acc_t m_s, acc_t m_t, acc_t t_a, acc_t z_s, acc_t z_t, acc_t cross,
                           acc_t T, acc_t inv_T, acc_t beta, acc_t scale) {
  DivRow<acc_t> r{};
  r.nan = softmax_kl_overflows(m_s, inv_T) || softmax_kl_overflows(m_t, inv_T);
  r.inv_z_s = acc_t(1) / z_s;
  r.inv_z_t = acc_t(1) / z_t;
  r.log_ratio = std::log(z_s) - std::log(z_t);
  if (div == Divergence::ReverseKL) {
    const ReverseKLRow<acc_t> row = reverse_kl_finish_row<acc_t>(z_s, z_t, cross, m_t, t_a, T, scale);
    r.loss_part = row.loss;
    r.a = row.a;
    r.b = row.b;
  } else {
    r.a = divergence_grad_scale(div, T) * scale;
    const acc_t ls_a = -std::log(z_s), lt_a = (t_a - m_t) * inv_T - std::log(z_t);
    r.h_a = divergence_terms<ScalarOps<acc_t>>(div, lt_a - ls_a, std::exp(ls_a), std::exp(lt_a), beta,
                                               acc_t(1) - beta)
                .h;
  }
  return r;
}

template <typename scalar_t>
void divergence_rows(const SoftmaxKLProblem& p, double scale_d) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  using Ops = VecOps<acc_t>;
  constexpr int64_t K = L::kStep;
  const ClassDimView &sv = p.view, &tv = p.t_view, &gv = p.grad_view;
  const int64_t V = sv.V, rows = sv.A * sv.I;
  const scalar_t* s = p.s.const_data_ptr<scalar_t>();
  const scalar_t* t = p.t.const_data_ptr<scalar_t>();
  scalar_t* grad = p.compute_grad ? p.grad.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* row_loss = p.row_loss.mutable_data_ptr<acc_t>();
  const int64_t* target = p.target.defined() ? p.target.const_data_ptr<int64_t>() : nullptr;
  const Divergence div = p.divergence;
  const bool rkl = div == Divergence::ReverseKL;
  const acc_t T = p.T, inv_T = acc_t(1) / T, beta = p.jsd_beta, scale = scale_d;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  // Chunks of ~512K classes taken by the threads in turn (parallel_chunks)
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 19) / std::max<int64_t>(V, 1));
  const int64_t padded = (V + K - 1) / K * K;

  parallel_chunks(rows, chunk, [&](int64_t begin, int64_t end) {
    acc_t* es = scratch<acc_t>(2 * padded);  // e^ys; then e^yt (reverse KL: d), then w
    acc_t* et = es + padded;
    const Vec zero(0), vneg_inf(neg_inf), vinv_T(inv_T), vk(static_cast<acc_t>(kLog2e) * inv_T);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t ai = r / sv.I, ii = r % sv.I;
      const scalar_t* sr = s + ai * sv.stride_a + ii * sv.stride_i;
      const scalar_t* tr = t + ai * tv.stride_a + ii * tv.stride_i;
      scalar_t* gr = grad ? grad + ai * gv.stride_a + ii * gv.stride_i : nullptr;
      const int64_t out = ai * sv.row_stride_a + ii * sv.row_stride_i;
      if (target && target[out] == p.ignore_index) {
        row_loss[out] = 0;
        if (gr) std::fill(gr, gr + V, scalar_t(0));
        continue;
      }
      // Sweep 1: maxima (a NaN never becomes one: it reaches the sums) and the anchor.
      Vec max_s(neg_inf), max_t(neg_inf), anchor_t(0);
      for (int64_t j = 0; j < V; j += K) {
        const int64_t n = std::min(K, V - j);
        const Vec xs = Vec::set(vneg_inf, L::load(sr + j, n), n), xt = Vec::set(vneg_inf, L::load(tr + j, n), n);
        const Vec above = xs > max_s;
        max_s = Vec::blendv(max_s, xs, above);
        anchor_t = Vec::blendv(anchor_t, xt, above);
        max_t = Vec::blendv(max_t, xt, xt > max_t);
      }
      acc_t lanes_s[K], lanes_t[K], lanes_a[K];
      max_s.store(lanes_s);
      max_t.store(lanes_t);
      anchor_t.store(lanes_a);
      acc_t m_s = lanes_s[0], m_t = lanes_t[0], t_a = lanes_a[0];
      for (int64_t l = 1; l < K; ++l) {
        if (lanes_s[l] > m_s) {
          m_s = lanes_s[l];
          t_a = lanes_a[l];
        }
        m_t = std::max(m_t, lanes_t[l]);
      }
      const acc_t ref_s = m_s == neg_inf ? acc_t(0) : m_s, ref_t = m_t == neg_inf ? acc_t(0) : m_t;
      // Sweep 2: exponentials, sums; reverse KL: the anchored cross and d.
      const Vec vms(ref_s), vmt(ref_t), vta(t_a);
      Vec sum_s(0), sum_t(0), cross(0);
      for (int64_t j = 0; j < V; j += K) {
        const int64_t n = std::min(K, V - j);
        const Vec xs = L::load(sr + j, n), xt = L::load(tr + j, n);
        const Vec e_s = Vec::set(zero, exp2_nonpositive((xs - vms) * vk), n);
        const Vec e_t = Vec::set(zero, exp2_nonpositive((xt - vmt) * vk), n);
        e_s.store(es + j);
        sum_s = sum_s + e_s;
        sum_t = sum_t + e_t;
        if (rkl) {
          const Vec d = ((xs - vms) - (xt - vta)) * vinv_T;
          cross = cross + Vec::blendv(zero, e_s * d, e_s > zero);
          d.store(et + j);
        } else {
          e_t.store(et + j);
        }
      }
      DivRow<acc_t> row = finish_stats(div, m_s, m_t, t_a, reduce_sum(sum_s), reduce_sum(sum_t), reduce_sum(cross), T,
                                       inv_T, beta, scale);
      if (!rkl) {
        // Sweep 3: the loss and W; w replaces e^yt.
        const Vec izs(row.inv_z_s), izt(row.inv_z_t), lr(row.log_ratio), vh_a(row.h_a), vbeta(beta),
            v1mb(acc_t(1) - beta);
        Vec loss(0), total_w(0);
        for (int64_t j = 0; j < V; j += K) {
          const int64_t n = std::min(K, V - j);
          const Vec xs = L::load(sr + j, n), xt = L::load(tr + j, n);
          const Vec ps = Vec::loadu(es + j) * izs, pt = Vec::loadu(et + j) * izt;
          const Vec d = ((xt - vmt) - (xs - vms)) * vinv_T + lr;
          const ClassTerms<Vec> c = divergence_terms<Ops>(div, d, ps, pt, vbeta, v1mb);
          const Vec w = Vec::set(zero, divergence_weight<Ops>(div, c, ps, vh_a), n);
          loss = loss + Vec::set(zero, c.loss, n);
          total_w = total_w + w;
          w.store(et + j);
        }
        row.loss_part = divergence_loss_scale(div, T) * reduce_sum(loss);
        row.b = reduce_sum(total_w);
      }
      row_loss[out] = row.nan ? nan : row.loss_part;
      if (!gr) continue;
      if (row.nan) {
        std::fill(gr, gr + V, static_cast<scalar_t>(nan));
        continue;
      }
      // Sweep 4: the gradient.
      const Vec va(row.a), vb(row.b), vqb(row.a * row.b * row.inv_z_s);
      for (int64_t j = 0; j < V; j += K) {
        const int64_t n = std::min(K, V - j);
        const Vec e_s = Vec::loadu(es + j), x = Vec::loadu(et + j);
        const Vec g = rkl ? Vec::blendv(zero, va * e_s * (x - vb), e_s > zero) : va * x - vqb * e_s;
        L::store(gr + j, g, n);
      }
    }
  });
}

// Columns layout: K neighbouring rows (stride_i == 1) as the lanes of a vector.
template <typename scalar_t>
void divergence_columns(const SoftmaxKLProblem& p, double scale_d) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  using Ops = VecOps<acc_t>;
  constexpr int64_t K = L::kStep;
  const ClassDimView &sv = p.view, &tv = p.t_view, &gv = p.grad_view;
  const int64_t V = sv.V, blocks_per_a = (sv.I + K - 1) / K;
  const scalar_t* s = p.s.const_data_ptr<scalar_t>();
  const scalar_t* t = p.t.const_data_ptr<scalar_t>();
  scalar_t* grad = p.compute_grad ? p.grad.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* row_loss = p.row_loss.mutable_data_ptr<acc_t>();
  const int64_t* target = p.target.defined() ? p.target.const_data_ptr<int64_t>() : nullptr;
  const Divergence div = p.divergence;
  const bool rkl = div == Divergence::ReverseKL;
  const acc_t T = p.T, inv_T = acc_t(1) / T, beta = p.jsd_beta, scale = scale_d;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 16) / (K * std::max<int64_t>(V, 1)));

  parallel_chunks(sv.A * blocks_per_a, chunk, [&](int64_t begin, int64_t end) {
    acc_t* es = scratch<acc_t>(2 * V * K);
    acc_t* et = es + V * K;
    const Vec zero(0), vinv_T(inv_T), vk(static_cast<acc_t>(kLog2e) * inv_T);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t ai = blk / blocks_per_a, i0 = (blk % blocks_per_a) * K;
      const int64_t n = std::min(K, sv.I - i0);  // live lanes; the others compute garbage
      const scalar_t* sb = s + ai * sv.stride_a + i0;
      const scalar_t* tb = t + ai * tv.stride_a + i0;
      const int64_t out0 = ai * sv.row_stride_a + i0 * sv.row_stride_i;
      acc_t ignored[K];
      for (int64_t l = 0; l < K; ++l) {
        ignored[l] = l < n && target && target[out0 + l * sv.row_stride_i] == p.ignore_index ? 1 : 0;
      }
      Vec max_s(neg_inf), max_t(neg_inf), anchor_t(0);
      for (int64_t j = 0; j < V; ++j) {
        const Vec xs = L::load(sb + j * sv.stride_v, n), xt = L::load(tb + j * tv.stride_v, n);
        const Vec above = xs > max_s;
        max_s = Vec::blendv(max_s, xs, above);
        anchor_t = Vec::blendv(anchor_t, xt, above);
        max_t = Vec::blendv(max_t, xt, xt > max_t);
      }
      const Vec vms = Vec::blendv(max_s, zero, max_s == Vec(neg_inf));
      const Vec vmt = Vec::blendv(max_t, zero, max_t == Vec(neg_inf));
      Vec sum_s(0), sum_t(0), cross(0);
      for (int64_t j = 0; j < V; ++j) {
        const Vec xs = L::load(sb + j * sv.stride_v, n), xt = L::load(tb + j * tv.stride_v, n);
        const Vec e_s = exp2_nonpositive((xs - vms) * vk), e_t = exp2_nonpositive((xt - vmt) * vk);
        e_s.store(es + j * K);
        sum_s = sum_s + e_s;
        sum_t = sum_t + e_t;
        if (rkl) {
          const Vec d = ((xs - vms) - (xt - anchor_t)) * vinv_T;
          cross = cross + Vec::blendv(zero, e_s * d, e_s > zero);
          d.store(et + j * K);
        } else {
          e_t.store(et + j * K);
        }
      }
      acc_t m_s[K], m_t[K], t_a[K], z_s[K], z_t[K], c[K];
      max_s.store(m_s);
      max_t.store(m_t);
      anchor_t.store(t_a);
      sum_s.store(z_s);
      sum_t.store(z_t);
      cross.store(c);
      DivRow<acc_t> lane[K];
      acc_t a_l[K], b_l[K], izs[K], izt[K], lr[K], h_a[K], nan_l[K];
      for (int64_t l = 0; l < K; ++l) {
        lane[l] = finish_stats(div, m_s[l], m_t[l], t_a[l], z_s[l], z_t[l], c[l], T, inv_T, beta, scale);
        a_l[l] = lane[l].a;
        b_l[l] = lane[l].b;
        izs[l] = lane[l].inv_z_s;
        izt[l] = lane[l].inv_z_t;
        lr[l] = lane[l].log_ratio;
        h_a[l] = lane[l].h_a;
        nan_l[l] = lane[l].nan ? 1 : 0;
      }
      const Vec vizs = Vec::loadu(izs), vizt = Vec::loadu(izt), vlr = Vec::loadu(lr), vh_a = Vec::loadu(h_a);
      if (!rkl) {
        const Vec vbeta(beta), v1mb(acc_t(1) - beta);
        Vec loss(0), total_w(0);
        for (int64_t j = 0; j < V; ++j) {
          const Vec xs = L::load(sb + j * sv.stride_v, n), xt = L::load(tb + j * tv.stride_v, n);
          const Vec ps = Vec::loadu(es + j * K) * vizs, pt = Vec::loadu(et + j * K) * vizt;
          const Vec d = ((xt - vmt) - (xs - vms)) * vinv_T + vlr;
          const ClassTerms<Vec> ct = divergence_terms<Ops>(div, d, ps, pt, vbeta, v1mb);
          const Vec w = divergence_weight<Ops>(div, ct, ps, vh_a);
          loss = loss + ct.loss;
          total_w = total_w + w;
          w.store(et + j * K);
        }
        acc_t loss_l[K];
        loss.store(loss_l);
        total_w.store(b_l);
        for (int64_t l = 0; l < K; ++l) lane[l].loss_part = divergence_loss_scale(div, T) * loss_l[l];
      }
      for (int64_t l = 0; l < n; ++l) {
        row_loss[out0 + l * sv.row_stride_i] = ignored[l] != 0 ? acc_t(0) : lane[l].nan ? nan
                                                                                        : lane[l].loss_part;
      }
      if (!grad) continue;
      scalar_t* gb = grad + ai * gv.stride_a + i0;
      const Vec va = Vec::loadu(a_l), vb = Vec::loadu(b_l), vqb = va * vb * vizs;
      const Vec ign = Vec::loadu(ignored) != zero, bad = Vec::loadu(nan_l) != zero;
      for (int64_t j = 0; j < V; ++j) {
        const Vec e_s = Vec::loadu(es + j * K), x = Vec::loadu(et + j * K);
        Vec g = rkl ? Vec::blendv(zero, va * e_s * (x - vb), e_s > zero) : va * x - vqb * e_s;
        g = Vec::blendv(Vec::blendv(g, Vec(nan), bad), zero, ign);  // exact zeros, even for NaN input
        L::store(gb + j * gv.stride_v, g, n);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Sparse teachers: rows [R, V] (classes contiguous), the teacher's [R, k] int64 indices and
// log-probabilities (accumulation dtype).

template <typename scalar_t>
void topk_rows(const SoftmaxKLTopKProblem& p, double scale_d) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  using Ops = ScalarOps<acc_t>;
  constexpr int64_t K = L::kStep;
  const int64_t V = p.V, k = p.k;
  const scalar_t* s = p.s.const_data_ptr<scalar_t>();
  const int64_t* indices = p.indices.const_data_ptr<int64_t>();
  const acc_t* logprobs = p.logprobs.const_data_ptr<acc_t>();
  scalar_t* grad = p.compute_grad ? p.grad.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* row_loss = p.row_loss.mutable_data_ptr<acc_t>();
  const int64_t* target = p.target.defined() ? p.target.const_data_ptr<int64_t>() : nullptr;
  const Divergence div = p.divergence;
  const bool renormalize = p.renormalize, has_tail = !renormalize && k < V;
  const acc_t T = p.T, inv_T = acc_t(1) / T, beta = p.jsd_beta, one_minus_beta = acc_t(1) - beta;
  const acc_t loss_scale = divergence_loss_scale(div, T), grad_scale = divergence_grad_scale(div, T) * acc_t(scale_d);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  // Chunks of ~512K classes taken by the threads in turn, as for dense teachers.
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 19) / std::max<int64_t>(renormalize ? k : V, 1));
  const int64_t padded = (V + K - 1) / K * K;

  parallel_chunks(p.rows, chunk, [&](int64_t begin, int64_t end) {
    // e^ys of the classes outside K (0 on K: the tail's), and 1 on the row's top-k classes
    // (0 elsewhere; cleared after each row)
    acc_t* es = renormalize ? nullptr : scratch<acc_t>(padded);
    thread_local std::vector<acc_t> marks;
    if (static_cast<int64_t>(marks.size()) < padded) marks.assign(padded, 0);
    acc_t* mark = marks.data();
    const Vec zero(0), vk(static_cast<acc_t>(kLog2e) * inv_T);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* sr = s + r * p.s_row_stride;
      const int64_t* ir = indices + r * k;
      const acc_t* lr = logprobs + r * k;
      scalar_t* gr = grad ? grad + r * V : nullptr;
      if (target && target[r] == p.ignore_index) {
        row_loss[r] = 0;
        if (gr) std::fill(gr, gr + V, scalar_t(0));
        continue;
      }
      int64_t marked = 0;
      const auto unmark = [&] {
        for (int64_t c = 0; c < marked; ++c) mark[ir[c]] = 0;
      };
      for (; marked < k; ++marked) {
        const int64_t j = ir[marked];
        if (j < 0 || j >= V || mark[j] != 0) {  // the errors of kdfast._checks.check_topk_indices
          unmark();
          TORCH_CHECK_VALUE(j >= 0 && j < V, "teacher_logits.indices holds class index ", j, " outside [0, ", V,
                            ") for logits with ", V, " classes");
          TORCH_CHECK_VALUE(false, "teacher_logits.indices repeats class ", j, " in row ", r,
                            " (rows counted in order over the dims other than the class dim); the top-k classes of "
                            "a row must be distinct");
        }
        mark[j] = 1;
      }
      // The student over K: its maximum and the teacher's log-probability there (the anchor).
      acc_t m_k = neg_inf, lp_a = neg_inf, m_lp = neg_inf;
      for (int64_t c = 0; c < k; ++c) {
        const acc_t x = static_cast<acc_t>(sr[ir[c]]);
        if (x > m_k) {
          m_k = x;
          lp_a = lr[c];
        }
        m_lp = std::max(m_lp, lr[c]);
      }
      // bucket: one sweep over the row, centred on K's maximum (the row's is unknown until
      // its end): its maximum, e^ys outside K into the scratch, Z and the tail's Z_tail.
      // Centred on the row's maximum instead (a second sweep) when the row rises more than
      // 64 T above K's (e^64: far from float32's range, whatever V).
      acc_t ref = m_k == neg_inf ? acc_t(0) : m_k, m = m_k, z = 0, z_tail = 0, ref_tail = ref;
      if (!renormalize) {
        const auto sweep = [&] {
          const Vec vref(ref);
          Vec max_s(neg_inf), sum(0), tail(0);
          for (int64_t j = 0; j < V; j += K) {
            const int64_t n = std::min(K, V - j);
            const Vec x = Vec::set(Vec(neg_inf), L::load(sr + j, n), n);
            max_s = Vec::blendv(max_s, x, x > max_s);
            // (x - ref)/T <= 64 unless the row rises above K's maximum by more (then swept again,
            // centred on the row's maximum): within exp2_nonpositive's range either way.
            const Vec e = exp2_nonpositive((x - vref) * vk);
            const Vec e_tail = Vec::blendv(e, zero, Vec::loadu(mark + j) != zero);
            e_tail.store(es + j);
            sum = sum + e;
            tail = tail + e_tail;
          }
          m = std::max(m_k, reduce_max(max_s));
          z = reduce_sum(sum);
          z_tail = reduce_sum(tail);
        };
        sweep();
        if ((m - ref) * inv_T > acc_t(64)) {
          ref = m;
          sweep();
        }
        ref_tail = ref;
        if (has_tail && !(z_tail >= acc_t(1e-30))) {
          // The tail's mass underflows next to K's (or is NaN): its own maximum keeps log
          // q_tail (and the spread of its gradient) exact.
          acc_t m_tail = neg_inf;
          for (int64_t j = 0; j < V; ++j) {
            if (mark[j] == 0) m_tail = std::max(m_tail, static_cast<acc_t>(sr[j]));
          }
          ref_tail = m_tail == neg_inf ? acc_t(0) : m_tail;
          z_tail = 0;
          for (int64_t j = 0; j < V; ++j) {
            es[j] = mark[j] != 0 ? acc_t(0) : std::exp((static_cast<acc_t>(sr[j]) - ref_tail) * inv_T);
            z_tail += es[j];
          }
        }
      } else {
        for (int64_t c = 0; c < k; ++c) z += std::exp((static_cast<acc_t>(sr[ir[c]]) - ref) * inv_T);
      }
      const acc_t log_z = std::log(z);
      // The teacher over K: bucket, log p as stored and sum p; renormalize, logprobs/T renormalised.
      const acc_t ref_t = renormalize && m_lp != neg_inf ? m_lp : acc_t(0);
      acc_t z_t = 0;
      for (int64_t c = 0; c < k; ++c) z_t += std::exp((lr[c] - ref_t) * inv_T);
      const acc_t log_z_t = renormalize ? std::log(z_t) : acc_t(0);
      // The coarse problem's anchor: the student's most probable class of K, or the tail.
      acc_t ls_a = (m_k - ref) * inv_T - log_z, lt_a = (lp_a - ref_t) * inv_T - log_z_t;
      acc_t ls_tail = neg_inf, lt_tail = neg_inf;
      if (has_tail) {
        ls_tail = (ref_tail - ref) * inv_T + std::log(z_tail) - log_z;
        lt_tail = topk_teacher_log_tail(z_t);
        if (ls_tail > ls_a) {
          ls_a = ls_tail;
          lt_a = lt_tail;
        }
      }
      const acc_t h_a = divergence_terms<Ops>(div, lt_a - ls_a, std::exp(ls_a), std::exp(lt_a), beta,
                                              one_minus_beta)
                            .h;
      const auto class_terms = [&](int64_t c, acc_t& ps) {
        const acc_t xs = static_cast<acc_t>(sr[ir[c]]) - ref, xt = lr[c] - ref_t;
        ps = std::exp(xs * inv_T - log_z);
        return divergence_terms<Ops>(div, (xt - xs) * inv_T + (log_z - log_z_t), ps, std::exp(xt * inv_T - log_z_t),
                                     beta, one_minus_beta);
      };
      acc_t loss = 0, total_w = 0, q_tail = 0, w_tail = 0;
      for (int64_t c = 0; c < k; ++c) {
        acc_t ps;
        const ClassTerms<acc_t> ct = class_terms(c, ps);
        loss += ct.loss;
        total_w += divergence_weight<Ops>(div, ct, ps, h_a);
      }
      if (has_tail) {
        q_tail = std::exp(ls_tail);
        const ClassTerms<acc_t> ct =
            divergence_terms<Ops>(div, lt_tail - ls_tail, q_tail, std::exp(lt_tail), beta, one_minus_beta);
        loss += ct.loss;
        w_tail = divergence_weight<Ops>(div, ct, q_tail, h_a);
        total_w += w_tail;
      }
      const bool nan_row = softmax_kl_overflows(m, inv_T);
      row_loss[r] = nan_row ? nan : loss_scale * loss;
      if (gr) {
        if (nan_row) {
          std::fill(gr, gr + V, static_cast<scalar_t>(nan));
        } else if (renormalize) {
          std::fill(gr, gr + V, scalar_t(0));
        } else {  // outside K: the tail's w_tail - q_tail W spread by the softmax within the tail
          const Vec c_tail(z_tail > acc_t(0) ? grad_scale * (w_tail - q_tail * total_w) / z_tail : acc_t(0));
          for (int64_t j = 0; j < V; j += K) L::store(gr + j, c_tail * Vec::loadu(es + j), std::min(K, V - j));
        }
        if (!nan_row) {
          for (int64_t c = 0; c < k; ++c) {
            acc_t ps;
            const ClassTerms<acc_t> ct = class_terms(c, ps);
            gr[ir[c]] = static_cast<scalar_t>(grad_scale * (divergence_weight<Ops>(div, ct, ps, h_a) - ps * total_w));
          }
        }
      }
      unmark();
    }
  });
}

}  // namespace

void softmax_divergence_cpu(const SoftmaxKLProblem& p, double scale) {
  KDFAST_DISPATCH_FLOATING(p.s.scalar_type(), "softmax_divergence_cpu", [&] {
    if (p.layout == KernelLayout::Rows) {
      divergence_rows<scalar_t>(p, scale);
    } else {
      divergence_columns<scalar_t>(p, scale);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_topk_cpu(const at::Tensor& s, const at::Tensor& indices,
                                                       const at::Tensor& logprobs,
                                                       const std::optional<at::Tensor>& target,
                                                       const at::Tensor& scale, double T, int64_t ignore_index,
                                                       c10::string_view divergence, double jsd_beta, bool renormalize,
                                                       bool compute_grad) {
  // The gradient from reused memory (csrc/cpu/memory.h): no page faults on a fresh one.
  const SoftmaxKLTopKProblem p = prepare_softmax_kl_topk(s, indices, logprobs, target, T, ignore_index, divergence,
                                                         jsd_beta, renormalize, compute_grad, &empty_like_reused);
  const double grad_scale = scale.item<double>();
  KDFAST_DISPATCH_FLOATING(p.s.scalar_type(), "softmax_kl_topk_cpu", [&] { topk_rows<scalar_t>(p, grad_scale); });
  return {p.row_loss, p.grad};
}

}  // namespace CPU_CAPABILITY
}  // namespace kdfast
