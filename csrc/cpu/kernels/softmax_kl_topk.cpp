// Fused temperature-softmax divergences against a sparse (top-k) teacher on the CPU (math:
// csrc/softmax_kl_math.h, "Sparse teachers"), compiled once per instruction set
// (csrc/cpu/dispatch.h); its entry point joins the table of csrc/cpu/kernels/softmax_kl.cpp.
//
// Rows [R, V] (classes contiguous), the teacher's k entries per row; the student row in one
// sweep (bucket: centred on the maximum over K, its exponentials, Z and the tail's sum
// through a mask of the row's top-k classes; renormalize: only its k entries), and the
// gradient from the scratch row. O(rows) memory beyond the inputs and the gradient, a
// scratch row and the mask per thread.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
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
  // Chunks of ~512K classes taken by the threads in turn, as for dense teachers.
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 19) / std::max<int64_t>(renormalize ? k : V, 1));
  const int64_t padded = (V + K - 1) / K * K;
  const bool stream = grad != nullptr && stream_stores(p.grad.nbytes(), at::get_num_threads());

  parallel_chunks(p.rows, chunk, [&](int64_t begin, int64_t end) {
    // e^ys of the classes outside K (0 on K: the tail's; 0 in the padding), and 1 on the
    // row's top-k classes (0 elsewhere; cleared after each row)
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
      // its end): its maximum, e^ys into the scratch and Z; then K's classes are cleared in the
      // scratch and the tail's Z_tail summed from it (from L1/L2: the sweep itself tests no
      // membership). Centred on the row's maximum instead (a second sweep) when the row rises
      // more than 64 T above K's (e^64: far from float32's range, whatever V).
      acc_t ref = m_k == neg_inf ? acc_t(0) : m_k, m = m_k, z = 0, z_tail = 0, ref_tail = ref;
      if (!renormalize) {
        // The next row of this chunk, fetched into L2 during this row's sweep (its arithmetic
        // overlaps the next row's trip from memory).
        const scalar_t* next = r + 1 < end ? sr + p.s_row_stride : nullptr;
        const auto sweep = [&] {
          const Vec vref(ref);
          Vec max_s(neg_inf), sum(0);
          for (int64_t j = 0; j < V; j += K) {
            if (next != nullptr) prefetch_l2(next + j);
            const int64_t n = std::min(K, V - j);
            const Vec x = Vec::set(Vec(neg_inf), L::load(sr + j, n), n);
            max_s = Vec::blendv(max_s, x, x > max_s);
            // (x - ref)/T <= 64 unless the row rises above K's maximum by more (then swept again,
            // centred on the row's maximum): within exp2_nonpositive's range either way.
            const Vec e = exp2_nonpositive((x - vref) * vk);
            e.store(es + j);
            sum = sum + e;
          }
          m = std::max(m_k, reduce_max(max_s));
          z = reduce_sum(sum);
        };
        sweep();
        if ((m - ref) * inv_T > acc_t(64)) {
          ref = m;
          sweep();
        }
        for (int64_t c = 0; c < k; ++c) es[ir[c]] = 0;
        Vec tail0(0), tail1(0);
        int64_t j = 0;
        for (; j + 2 * K <= padded; j += 2 * K) {
          tail0 = tail0 + Vec::loadu(es + j);
          tail1 = tail1 + Vec::loadu(es + j + K);
        }
        for (; j < padded; j += K) tail0 = tail0 + Vec::loadu(es + j);
        z_tail = reduce_sum(tail0 + tail1);
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
        // The row: NaN, 0 (renormalize) or, outside K, the tail's w_tail - q_tail W spread by
        // the softmax within the tail (es is 0 on K); non-temporal stores when the gradient
        // outgrows the caches. Then K's classes, ordinary stores after the fence.
        const bool spread = !renormalize && !nan_row;
        const Vec value(nan_row                       ? nan
                        : spread && z_tail > acc_t(0) ? grad_scale * (w_tail - q_tail * total_w) / z_tail
                                                      : acc_t(0));
        for (int64_t j = 0; j < V; j += K) {
          const int64_t n = std::min(K, V - j);
          const Vec g = spread ? value * Vec::loadu(es + j) : value;
          if (stream && n == K) {
            L::store_stream(gr + j, g);
          } else {
            L::store(gr + j, g, n);
          }
        }
        if (stream) stream_fence();
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
