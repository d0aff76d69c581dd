// Fused temperature-softmax divergences against a sparse (top-k) teacher on the CPU (math:
// csrc/softmax_kl_math.h, "Sparse teachers"), compiled once per instruction set
// (csrc/cpu/dispatch.h); its entry point joins the table of csrc/cpu/kernels/softmax_kl.cpp.
//
// Rows [R, V] (classes contiguous), the teacher's k entries per row; the student row in one
// sweep (bucket: centred on the maximum over K, its exponentials into a scratch row, Z, and
// the tail's Z as Z minus K's share or summed from the scratch; renormalize: only its k
// entries), and the gradient from the scratch row, written in the loop that sweeps the next
// row (two scratch rows in turn). O(rows) memory beyond the inputs and the gradient: two
// scratch rows and the mask per thread.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/kernels/softmax_kl_topk.h"
#include "cpu/memory.h"
#include "cpu/vec.h"

namespace kdfast {
inline namespace CPU_CAPABILITY {
namespace {

constexpr double kLog2e = 1.4426950408889634;

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
  // Chunks of ~2M classes (64 rows of 32k) taken by the threads in turn: four times the dense
  // kernel's, since a chunk's first row is swept and its last row's gradient written alone
  // (outside the pipeline below): 1 row in 64 instead of 1 in 16 measured 16 against 19 ms at
  // 2048 x 32000.
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 21) / std::max<int64_t>(renormalize ? k : V, 1));
  const int64_t padded = (V + K - 1) / K * K;
  const bool stream = grad != nullptr && stream_stores(p.grad.nbytes(), at::get_num_threads());
  const auto ignored = [&](int64_t r) { return target != nullptr && target[r] == p.ignore_index; };

  // A row's student statistics: over K, its maximum m_k and the teacher's log-probability
  // there (lp_a, the anchor), the teacher's largest log-probability; from the sweep, the
  // centre ref of its exponentials, the row's maximum m and z = sum e^((x - ref)/T).
  struct RowStats {
    acc_t m_k, lp_a, m_lp, ref, m, z;
  };

  parallel_chunks(p.rows, chunk, [&](int64_t begin, int64_t end) {
    // Two scratch rows in turn: e^ys of a row's classes (0 in the padding; then 0 on K, the
    // tail's) while the previous row's gradient is written from the other.
    acc_t* es_buffers = renormalize ? nullptr : scratch<acc_t>(2 * padded);
    // 1 on the row's top-k classes (0 elsewhere; cleared after each row)
    thread_local std::vector<acc_t> marks;
    if (static_cast<int64_t>(marks.size()) < padded) marks.assign(padded, 0);
    acc_t* mark = marks.data();
    thread_local std::vector<acc_t> k_terms;  // a row's top-k classes: x_s, q_s and w
    if (static_cast<int64_t>(k_terms.size()) < 3 * k) k_terms.resize(3 * k);
    acc_t *k_xs = k_terms.data(), *k_ps = k_xs + k, *k_w = k_ps + k;
    const Vec zero(0), vk(static_cast<acc_t>(kLog2e) * inv_T);
    const auto row_of = [&](int64_t r) { return s + r * p.s_row_stride; };
    const auto unmark = [&](int64_t r, int64_t marked) {
      for (int64_t c = 0; c < marked; ++c) mark[indices[r * k + c]] = 0;
    };

    // Marks row r's top-k classes (checking them: the errors of
    // kdfast._checks.check_topk_indices) and returns its statistics over K.
    const auto prepare = [&](int64_t r) {
      const int64_t* ir = indices + r * k;
      const acc_t* lr = logprobs + r * k;
      for (int64_t marked = 0; marked < k; ++marked) {
        const int64_t j = ir[marked];
        if (j < 0 || j >= V || mark[j] != 0) {
          unmark(r, marked);
          TORCH_CHECK_VALUE(j >= 0 && j < V, "teacher_logits.indices holds class index ", j, " outside [0, ", V,
                            ") for logits with ", V, " classes");
          TORCH_CHECK_VALUE(false, "teacher_logits.indices repeats class ", j, " in row ", r,
                            " (rows counted in order over the dims other than the class dim); the top-k classes of "
                            "a row must be distinct");
        }
        mark[j] = 1;
      }
      const scalar_t* sr = row_of(r);
      RowStats st{neg_inf, neg_inf, neg_inf, 0, neg_inf, 0};
      for (int64_t c = 0; c < k; ++c) {
        const acc_t x = static_cast<acc_t>(sr[ir[c]]);
        if (x > st.m_k) {
          st.m_k = x;
          st.lp_a = lr[c];
        }
        st.m_lp = std::max(st.m_lp, lr[c]);
      }
      st.ref = st.m_k == neg_inf ? acc_t(0) : st.m_k;
      st.m = st.m_k;
      return st;
    };

    // Lanes [j, j + n) of a row's gradient outside K: value es (spread) or value;
    // non-temporal stores when the gradient outgrows the caches.
    const auto write_grad = [&](scalar_t* gr, const acc_t* es, const Vec& value, bool spread, int64_t j, int64_t n) {
      const Vec g = spread ? value * Vec::loadu(es + j) : value;
      if (stream && n == K) {
        L::store_stream(gr + j, g);
      } else {
        L::store(gr + j, g, n);
      }
    };

    // bucket: one sweep over row sr centred on st.ref (K's maximum: the row's is unknown until
    // its end): its maximum, e^ys into es and z. When gr is given, the same loop writes the
    // previous row's gradient gr = value es_prev (or value where !spread) beside it: reads and
    // writes in flight together, as in a copy, instead of one after the other. `next`: a row
    // fetched into L2 meanwhile (nullptr: none).
    const auto sweep = [&](const scalar_t* sr, RowStats& st, acc_t* es, const scalar_t* next, scalar_t* gr,
                           const acc_t* es_prev, acc_t value_d, bool spread) {
      const Vec vref(st.ref), value(value_d);
      Vec max0(neg_inf), max1(neg_inf), sum0(0), sum1(0);
      // Two vectors at a time: two running maxima and sums, so that neither waits on the
      // latency of its previous step (a NaN is dropped from the maximum: it reaches z).
      const auto step = [&](const Vec& x, Vec& max_s, Vec& sum, acc_t* es_j) {
        max_s = max_dropping_nan(max_s, x);
        // (x - ref)/T <= 64 unless the row rises above K's maximum by more (then swept again,
        // centred on the row's maximum): within exp2_nonpositive's range either way.
        const Vec e = exp2_nonpositive((x - vref) * vk);
        e.store(es_j);
        sum = sum + e;
      };
      int64_t j = 0;
      for (; j + 2 * K <= V; j += 2 * K) {
        if (next != nullptr) {
          prefetch_l2(next + j);
          prefetch_l2(next + j + K);
        }
        if (gr != nullptr) {
          write_grad(gr, es_prev, value, spread, j, K);
          write_grad(gr, es_prev, value, spread, j + K, K);
        }
        step(L::load(sr + j), max0, sum0, es + j);
        step(L::load(sr + j + K), max1, sum1, es + j + K);
      }
      for (; j < V; j += K) {
        const int64_t n = std::min(K, V - j);
        if (next != nullptr) prefetch_l2(next + j);
        if (gr != nullptr) write_grad(gr, es_prev, value, spread, j, n);
        step(Vec::set(Vec(neg_inf), L::load(sr + j, n), n), max0, sum0, es + j);
      }
      st.m = std::max(st.m_k, reduce_max(max_dropping_nan(max0, max1)));
      st.z = reduce_sum(sum0 + sum1);
    };
    // Centred on the row's maximum instead (a second sweep) when the row rises more than 64 T
    // above K's (e^64: far from float32's range, whatever V).
    const auto resweep_if_needed = [&](const scalar_t* sr, RowStats& st, acc_t* es) {
      if ((st.m - st.ref) * inv_T > acc_t(64)) {
        st.ref = st.m;
        sweep(sr, st, es, nullptr, nullptr, nullptr, 0, false);
      }
    };

    // Row `begin` is prepared and swept alone; each later row r + 1 is swept while row r's
    // gradient is written (the next row of this chunk fetched into L2 meanwhile).
    int64_t cur = 0;  // which scratch row holds row r's e^ys
    RowStats st{};
    bool ready = false;  // row r prepared (and, bucket, swept)
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* sr = row_of(r);
      const int64_t* ir = indices + r * k;
      const acc_t* lr = logprobs + r * k;
      scalar_t* gr = grad ? grad + r * V : nullptr;
      acc_t* es = renormalize ? nullptr : es_buffers + cur * padded;
      if (ignored(r)) {
        row_loss[r] = 0;
        if (gr) std::fill(gr, gr + V, scalar_t(0));
        ready = false;
        continue;
      }
      if (!ready) {
        st = prepare(r);
        if (!renormalize) {
          sweep(sr, st, es, r + 1 < end ? row_of(r + 1) : nullptr, nullptr, nullptr, 0, false);
          resweep_if_needed(sr, st, es);
        }
      }
      const acc_t ref = st.ref, m_k = st.m_k, lp_a = st.lp_a, m_lp = st.m_lp, m = st.m;
      acc_t z = st.z, z_tail = 0, ref_tail = ref;
      if (!renormalize) {
        // K's share z_k taken from the scratch and cleared there, and the tail's Z_tail from
        // z or summed from the scratch (from L1/L2: the sweep itself tests no membership).
        acc_t z_k = 0;
        for (int64_t c = 0; c < k; ++c) {
          z_k += es[ir[c]];
          es[ir[c]] = 0;
        }
        if (z_k <= acc_t(0.5) * z) {
          // The tail holds at least half of z: z - z_k loses at most a factor 2 of z's relative
          // precision to cancellation, and spares a pass over the scratch.
          z_tail = z - z_k;
        } else {
          Vec tail0(0), tail1(0);
          int64_t j = 0;
          for (; j + 2 * K <= padded; j += 2 * K) {
            tail0 = tail0 + Vec::loadu(es + j);
            tail1 = tail1 + Vec::loadu(es + j + K);
          }
          for (; j < padded; j += K) tail0 = tail0 + Vec::loadu(es + j);
          z_tail = reduce_sum(tail0 + tail1);
        }
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
      unmark(r, k);
      const acc_t log_z = std::log(z);
      // The teacher over K: bucket, log p as stored and sum p; renormalize, logprobs/T renormalised.
      const acc_t ref_t = renormalize && m_lp != neg_inf ? m_lp : acc_t(0);
      // (K's classes a vector of them at a time here and below, the last k % K one by one.)
      const int64_t k_vec = k / K * K;
      Vec sum_t(0);
      for (int64_t c = 0; c < k_vec; c += K) sum_t = sum_t + ((Vec::loadu(lr + c) - Vec(ref_t)) * Vec(inv_T)).exp();
      acc_t z_t = reduce_sum(sum_t);
      for (int64_t c = k_vec; c < k; ++c) z_t += std::exp((lr[c] - ref_t) * inv_T);
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
      // K's classes: their loss terms, and their q_s and w kept for the gradient (k each).
      const auto class_terms = [&]<typename O>(const typename O::V& x_s, const typename O::V& x_t, acc_t* ps_out,
                                               acc_t* w_out) {
        using W = typename O::V;
        const W xs = x_s - W(ref), xt = x_t - W(ref_t);
        const W ps = O::exp(xs * W(inv_T) - W(log_z));
        const ClassTerms<W> ct = divergence_terms<O>(div, (xt - xs) * W(inv_T) + W(log_z - log_z_t), ps,
                                                     O::exp(xt * W(inv_T) - W(log_z_t)), W(beta), W(one_minus_beta));
        const W w = divergence_weight<O>(div, ct, ps, W(h_a));
        if constexpr (std::is_same_v<W, acc_t>) {
          *ps_out = ps;
          *w_out = w;
        } else {
          ps.store(ps_out);
          w.store(w_out);
        }
        return std::pair<W, W>{ct.loss, w};
      };
      for (int64_t c = 0; c < k; ++c) k_xs[c] = static_cast<acc_t>(sr[ir[c]]);
      Vec loss_v(0), total_w_v(0);
      for (int64_t c = 0; c < k_vec; c += K) {
        const auto [l, w] = class_terms.template operator()<VecOps<acc_t>>(Vec::loadu(k_xs + c), Vec::loadu(lr + c),
                                                                           k_ps + c, k_w + c);
        loss_v = loss_v + l;
        total_w_v = total_w_v + w;
      }
      acc_t loss = reduce_sum(loss_v), total_w = reduce_sum(total_w_v), q_tail = 0, w_tail = 0;
      for (int64_t c = k_vec; c < k; ++c) {
        const auto [l, w] = class_terms.template operator()<Ops>(k_xs[c], lr[c], k_ps + c, k_w + c);
        loss += l;
        total_w += w;
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

      // The row's gradient: NaN, 0 (renormalize) or, outside K, the tail's w_tail - q_tail W
      // spread by the softmax within the tail (es is 0 on K). Bucket: written while the next
      // row is swept.
      const bool spread = !renormalize && !nan_row;
      const acc_t value = nan_row                       ? nan
                          : spread && z_tail > acc_t(0) ? grad_scale * (w_tail - q_tail * total_w) / z_tail
                                                        : acc_t(0);
      ready = false;
      if (!renormalize && r + 1 < end && !ignored(r + 1)) {
        const int64_t r1 = r + 1;
        acc_t* es1 = es_buffers + (1 - cur) * padded;
        st = prepare(r1);
        sweep(row_of(r1), st, es1, r1 + 1 < end ? row_of(r1 + 1) : nullptr, gr, es, value, spread);
        resweep_if_needed(row_of(r1), st, es1);
        ready = true;
      } else if (gr) {
        for (int64_t j = 0; j < V; j += K) write_grad(gr, es, Vec(value), spread, j, std::min(K, V - j));
      }
      // Then K's classes, ordinary stores after the fence.
      if (gr) {
        if (stream) stream_fence();
        if (!nan_row) {
          for (int64_t c = 0; c < k; ++c) gr[ir[c]] = static_cast<scalar_t>(grad_scale * (k_w[c] - k_ps[c] * total_w));
        }
      }
      cur = 1 - cur;
    }
  });
}

}  // namespace

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
