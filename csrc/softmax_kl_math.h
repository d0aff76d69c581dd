// Per-row math of the fused temperature-softmax KL, shared by the CPU and CUDA kernels.
//
// A row holds student logits s and teacher logits t over V classes. Each side is centred
// on its own maximum before anything else: y_j = (x_j - M)/T <= 0, M = max_j x_j. The kernels
// sweep the row for
//     M_s,  Z_s = sum_j exp(ys_j),   (same for t)
//     cross = sum_j exp(yt_j) * (yt_j - ys_j)
// over the "included" classes (all of them, or all but the target class g for
// DecoupledKD), and from these alone the row's loss and gradient follow:
//
//   KL(q || p) = sum_j q_j (log q_j - log p_j),   q = softmax(t/T), p = softmax(s/T)
//              = cross / Z_t - log Z_t + log Z_s   (log q_j = yt_j - log Z_t, likewise p)
//   loss_row   = T^2 KL                                   (Hinton's T^2)
//   d loss_row / d s_j = T (p_j - q_j)                    (the T^2 meets d z/d s = 1/T)
//
// Every term is of the size of the logits' spread within a row, not of the logits
// themselves: with the uncentred form (t - s)/T summed and (M_s - M_t)/T added back, a
// student sitting a constant c above the teacher cancelled two terms of size c/T (in
// float32 a relative error of the loss of 0.45 at c = 1e4). Kernels that keep running
// maxima (CUDA, Triton) re-centre `cross` when a maximum moves (softmax_kl_recentre).
// A logit whose x/T overflows (|x| > T * the largest float) gives the row NaN, as the
// definition (softmax of t/T and s/T) does; centring alone would hide the overflow.
//
// DecoupledKD (Zhao et al. 2022) with target class g, weights alpha (TCKD) and beta (NCKD):
//   p_g = p(g), p_ng = 1 - p_g, written through u_s = z_s,g - lse_s,nt (log-odds of g)
//   so that p_g = sigmoid(u_s) and p_ng = sigmoid(-u_s) are exact even when p_g -> 1;
//   TCKD = q_g log(q_g / max(p_g, eps)) + q_ng log(q_ng / max(p_ng, eps)),  eps = 1e-7
//   NCKD = KL over the non-target classes, each side renormalised (the included classes)
//   loss_row = T^2 (alpha TCKD + beta NCKD)
//   With D = d TCKD / d p_g * p_g p_ng  = -q_g p_ng [p_g >= eps] + q_ng p_g [p_ng >= eps]
//   (= p_g - q_g away from the clamp) the gradient is
//     j != g:  T ((beta - alpha D) phat_j - beta qhat_j)    phat, qhat: non-target softmaxes
//     j == g:  T alpha D
// so every kernel writes grad_j = a * phat_j - b * qhat_j with per-row constants a, b, and
// (DecoupledKD) the single value grad_g.
#pragma once
#include <cmath>
#include <limits>

#include "host_device.h"

namespace kdfast {

template <typename acc_t>
struct SoftmaxKLRowStats {
  acc_t max_s, sum_s;  // M_s and Z_s (sum of exp((s - M_s) / T)) over the included classes
  acc_t max_t, sum_t;
  acc_t cross;         // sum of exp(yt) (yt - ys) over the included classes (y: centred, above)
  acc_t s_g, t_g;      // logits of the target class (DecoupledKD only)
};

template <typename acc_t>
struct SoftmaxKLRowResult {
  acc_t loss;    // T^2-scaled row loss
  acc_t a, b;    // grad_j = a * exp(ys_j) - b * exp(yt_j)  (sums folded in)
  acc_t grad_g;  // gradient at the target class (DecoupledKD)
};

template <typename acc_t>
KDFAST_HD acc_t softplus_(acc_t x) {  // log(1 + exp(x)) without overflow
  return x > acc_t(0) ? x + log1p(exp(-x)) : log1p(exp(x));
}

template <typename acc_t>
KDFAST_HD acc_t xlogy_(acc_t x, acc_t log_y) {  // x * log_y with 0 * log 0 = 0
  return x == acc_t(0) ? acc_t(0) : x * log_y;
}

// Whether x/T overflows (to +-inf) for a finite x: the definition's softmax of x/T is then
// NaN. Checking the maxima (and DecoupledKD's target logits, outside them) covers every
// class that could overflow upwards; a row whose maximum overflows downwards is -inf
// throughout. Infinite or NaN logits make the row NaN through the sums already.
template <typename acc_t>
KDFAST_HD bool softmax_kl_overflows(acc_t x, acc_t inv_T) {
  const acc_t big = x * inv_T;
  return big - big != acc_t(0) && x - x == acc_t(0);
}

// Running statistics with moving maxima: `cross` was accumulated against the maxima
// (m_s, m_t) and `sum_t` = sum exp((t - m_t)/T) against m_t; returns cross against the new
// maxima (new_s, new_t), before sum_t is rescaled to new_t:
//   yt - ys = (yt' - ys') + ((new_t - m_t) - (new_s - m_s))/T,  exp(yt) = exp(yt') f_t^-1,
//   so cross' = f_t (cross - sum_t ((new_t - m_t) - (new_s - m_s))/T),  f_t = exp((m_t - new_t)/T).
// Nothing accumulated yet (sum_t == 0, e.g. maxima still -inf) needs nothing; f_t is the
// caller's rescale factor of sum_t.
template <typename acc_t>
KDFAST_HD acc_t softmax_kl_recentre(acc_t cross, acc_t sum_t, acc_t m_s, acc_t m_t, acc_t new_s, acc_t new_t,
                                    acc_t inv_T, acc_t f_t) {
  if (sum_t == acc_t(0)) return cross * f_t;
  return f_t * (cross - sum_t * ((new_t - m_t) - (new_s - m_s)) * inv_T);
}

// scale: d(reduced loss)/d(row loss), e.g. 1/B for 'batchmean'.
template <typename acc_t>
KDFAST_HD SoftmaxKLRowResult<acc_t> softmax_kl_finish_row(
    const SoftmaxKLRowStats<acc_t>& r, acc_t T, bool decoupled, acc_t alpha, acc_t beta,
    acc_t scale) {
  const acc_t inv_T = acc_t(1) / T;
  const acc_t log_sum_s = log(r.sum_s), log_sum_t = log(r.sum_t);
  const acc_t kl = r.cross / r.sum_t + log_sum_s - log_sum_t;
  const acc_t gs = T * scale;
  SoftmaxKLRowResult<acc_t> out;
  if (softmax_kl_overflows(r.max_s, inv_T) || softmax_kl_overflows(r.max_t, inv_T) ||
      (decoupled && (softmax_kl_overflows(r.s_g, inv_T) || softmax_kl_overflows(r.t_g, inv_T)))) {
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    out.loss = out.a = out.b = out.grad_g = nan;
    return out;
  }
  if (!decoupled) {
    out.loss = T * T * kl;
    out.a = gs / r.sum_s;
    out.b = gs / r.sum_t;
    out.grad_g = acc_t(0);
    return out;
  }
  const acc_t eps = acc_t(1e-7);
  const acc_t u_s = (r.s_g - r.max_s) * inv_T - log_sum_s;  // log(p_g / p_ng)
  const acc_t u_t = (r.t_g - r.max_t) * inv_T - log_sum_t;
  const acc_t log_p_g = -softplus_(-u_s), log_p_ng = -softplus_(u_s);
  const acc_t log_q_g = -softplus_(-u_t), log_q_ng = -softplus_(u_t);
  const acc_t p_g = exp(log_p_g), p_ng = exp(log_p_ng);
  const acc_t q_g = exp(log_q_g), q_ng = exp(log_q_ng);
  const acc_t log_eps = log(eps);
  const acc_t tckd = xlogy_(q_g, log_q_g) - q_g * (p_g >= eps ? log_p_g : log_eps) +
                     xlogy_(q_ng, log_q_ng) - q_ng * (p_ng >= eps ? log_p_ng : log_eps);
  const acc_t D = (p_g >= eps ? -q_g * p_ng : acc_t(0)) + (p_ng >= eps ? q_ng * p_g : acc_t(0));
  out.loss = T * T * (alpha * tckd + beta * kl);
  out.a = gs * (beta - alpha * D) / r.sum_s;
  out.b = gs * beta / r.sum_t;
  out.grad_g = gs * alpha * D;
  return out;
}

// ---------------------------------------------------------------------------------------
// The LLM divergences: reverse KL, generalized JSD, TVD, and sparse (top-k) teachers.
//
// Notation of this part (as in kdfast/ops/softmax_kl.py, the definitions): q = softmax(s/T)
// the student's distribution, p = softmax(t/T) the teacher's; per class c the centred
// logits ys_c = (s_c - M_s)/T <= 0, yt_c = (t_c - M_t)/T, so that
//   log q_c = ys_c - log Z_s,   log p_c = yt_c - log Z_t,   Z = sum_c exp(y_c):
// every term below is of the size of a row's spread, never of the logits (no cancellation
// of c/T when the student sits a constant c above the teacher).
//
// Every divergence D(q, p) of this family has, for the student's logits z = s/T,
//   dD/dz_c = q_c (h_c - H),   H = sum_j q_j h_j,   h_c = dD/dq_c (up to a constant),
// computed anchored on the student's most probable class (divergence_weight),
// (the softmax Jacobian dq_j/dz_c = q_j (delta_jc - q_c)), with, per class c:
//   forward KL  KL(p || q) = sum p (log p - log q)        h_c = -p_c/q_c,   q_c h_c = -p_c
//   reverse KL  KL(q || p) = sum q (log q - log p)        h_c = log q_c - log p_c,  H = RKL
//   JSD(beta)   beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q:
//               h_c = (1 - beta)(log q_c - log m_c),  H = (1 - beta) KL(q || m)
//               (the terms of d/dq_c through m cancel: -beta p_c (1-beta)/m_c
//               - (1-beta) q_c (1-beta)/m_c + (1-beta) = (1-beta)(1 - m_c/m_c) = 0)
//   TVD         1/2 sum |q - p|                             h_c = sign(q_c - p_c)/2
// The loss of a row is scale_T D and its gradient w.r.t. s is (scale_T / T) q_c (h_c - H),
// scale_T = T^2 (KLs, JSD) or T (TVD; see divergence_scale in kdfast/ops/softmax_kl.py).
//
// JSD computes log m in log space through d = log p_c - log q_c, without forming m:
//   d > 0:  log p_c - log m_c = -log(beta + (1 - beta) e^-d),  log q_c - log m_c = that - d
//   d <= 0: log q_c - log m_c = -log((1 - beta) + beta e^d),   log p_c - log m_c = that + d
// (one exp and one log per class, both differences exact to rounding however small m is).
//
// Passes over a dense row (s and t read from memory; on the CPU later sweeps re-read them
// from L2 or from a per-thread scratch row):
//   reverse KL  1: maxima (and t_a, the teacher's logit at the student's argmax); 2: Z_s,
//               Z_t and cross (reverse_kl_finish_row: the mirror of forward KL's cross term);
//               3: gradient.
//   JSD, TVD    1: maxima and t_a; 2: Z_s, Z_t; 3: the loss and W from divergence_terms and
//               divergence_weight; 4: gradient T' scale (w_c - q_c W).
//   (CUDA and Triton fold 1 and 2 into one online pass, re-centring when a maximum moves.)
//
// Sparse teachers (kdfast.TopK: k indices K and the teacher's log-probabilities at T = 1)
// define coarse distributions over which the same D is computed, and the gradient flows to
// the student's full softmax:
//   bucket       classes K and, when k < V, one tail class: p_tail = max(0, 1 - sum_K p)
//                (stored bfloat16 probabilities can sum past 1), q_tail = sum_{j not in K} q_j
//                from the student's full softmax (its own sum, not 1 - sum_K q, which
//                cancels for a confident student; and in log space, on the tail's own
//                maximum, so that it stays exact when the tail's mass underflows; the CPU
//                takes Z - Z_K where the tail holds at least half of Z, losing at most a
//                factor 2 of Z's relative precision); T = 1.
//                The dense formulas on the coarse classes give w_c - q'_c W for c in K; the
//                tail's w_tail - q_tail W is spread over the classes outside K in proportion
//                to the student's softmax within the tail (q_j / q_tail).
//   renormalize  q' = softmax over K of s_K/T, p' = softmax over K of logprobs/T (re-tempering
//                the stored log-probabilities is exact over K); outside K the gradient is 0.
// The student row is read once for its statistics (bucket) and once for the gradient; the
// teacher is read in O(k).

enum class Divergence : int {
  ForwardKL = 0,
  ReverseKL = 1,
  JSD = 2,
  TVD = 3,
};

// Elementwise operations on acc_t scalars; csrc/cpu/vec.h has the same for vectors of
// lanes (VecOps), so that divergence_terms serves the CPU's vector loops, the CPU's and the
// GPU's per-row code, and the CUDA kernels alike.
template <typename acc_t>
struct ScalarOps {
  using V = acc_t;
  static KDFAST_HD V exp(V x) { return ::exp(x); }
  static KDFAST_HD V log(V x) { return ::log(x); }
  static KDFAST_HD V abs(V x) { return x < V(0) ? -x : x; }
  static KDFAST_HD V select(bool mask, V a, V b) { return mask ? a : b; }
  static KDFAST_HD V sign(V x) { return x > V(0) ? V(1) : (x < V(0) ? V(-1) : V(0)); }
};

// One class's share of a row's divergence: its term of the loss, q_c h_c (0 where q_c = 0)
// and h_c. From d = log p_c - log q_c (the caller computes it from the centred logits,
// ((t_c - M_t) - (s_c - M_s))/T + log Z_s - log Z_t: one rounding of the difference, not of
// two large terms) and the probabilities q_c (ps), p_c (pt). A class of probability 0 on a
// side adds nothing weighted by that side (0 log 0 = 0), even where d is infinite or NaN.
template <typename V>
struct ClassTerms {
  V loss, qh, h;
};

// beta, one_minus_beta: JSD's weights (unused by the others).
template <typename Ops, typename V = typename Ops::V>
KDFAST_HD ClassTerms<V> divergence_terms(Divergence div, V d, V ps, V pt, V beta, V one_minus_beta) {
  const V zero(0), half(0.5);
  ClassTerms<V> out;
  switch (div) {
    case Divergence::ForwardKL: {
      out.loss = Ops::select(pt > zero, pt * d, zero);
      out.qh = zero - pt;
      out.h = zero - Ops::exp(d);
      break;
    }
    case Divergence::ReverseKL: {
      out.h = zero - d;
      out.loss = out.qh = Ops::select(ps > zero, ps * out.h, zero);
      break;
    }
    case Divergence::JSD: {
      const V e = Ops::exp(zero - Ops::abs(d));
      const auto teacher_above = d > zero;
      const V g = zero - Ops::log(Ops::select(teacher_above, beta + one_minus_beta * e, one_minus_beta + beta * e));
      const V gt = Ops::select(teacher_above, g, g + d);   // log p - log m
      const V gs = Ops::select(teacher_above, g - d, g);   // log q - log m
      out.h = one_minus_beta * gs;
      out.qh = Ops::select(ps > zero, ps * out.h, zero);
      out.loss = beta * Ops::select(pt > zero, pt * gt, zero) + out.qh;
      break;
    }
    case Divergence::TVD:
    default: {
      const V gap = ps - pt;
      out.loss = half * Ops::abs(gap);
      out.h = half * Ops::sign(gap);
      out.qh = ps * out.h;
      break;
    }
  }
  return out;
}

// A class's share of the gradient anchored on the student's most probable class a:
//   dD/dz_c = q_c (h_c - H) = w_c - q_c W,  w_c = q_c (h_c - h_a),  W = sum_j w_j = H - h_a.
// For that class w_a = 0, and W sums the other classes' small q_j: no cancellation where
// the student is confident (q_a -> 1), which q_a (h_a - H) suffers (h_a ~ H, both of the
// size of log-ratios, their difference ~ 1 - q_a). Forward KL: w_c = -p_c - q_c h_a
// (h = -p/q is unbounded where q -> 0; h_a is not: q_a is the largest).
template <typename Ops, typename V = typename Ops::V>
KDFAST_HD V divergence_weight(Divergence div, const ClassTerms<V>& c, V ps, V h_a) {
  if (div == Divergence::ForwardKL) return c.qh - ps * h_a;
  return Ops::select(ps > V(0), ps * (c.h - h_a), V(0));
}

// The dense reverse KL of a row, anchored on the student's argmax a (s_a = M_s; t_a the
// teacher's logit there): with d_j = ((s_j - s_a) - (t_j - t_a))/T = (h_j - h_a) of RKL,
//   cross = sum_j e^ys_j d_j over the classes with e^ys_j > 0,
//   RKL = cross / Z_s + (M_t - t_a)/T + log Z_t - log Z_s,
// and the gradient of loss = T^2 RKL is a e^ys_c (d_c - b), a = T scale / Z_s, b = cross / Z_s
// (zero where e^ys_c = 0). A teacher that rules out the student's argmax (t_a = -inf) makes
// RKL +inf.
template <typename acc_t>
struct ReverseKLRow {
  acc_t loss, a, b;
};

// A cross that is NaN while the sums are not comes from a class with student mass where the
// teacher's logit is -inf (+inf - inf when the anchor moved): the RKL is +inf there.
template <typename acc_t>
KDFAST_HD ReverseKLRow<acc_t> reverse_kl_finish_row(acc_t sum_s, acc_t sum_t, acc_t cross, acc_t max_t, acc_t t_a,
                                                    acc_t T, acc_t scale) {
  const acc_t inv_T = acc_t(1) / T;
  acc_t rkl = cross / sum_s + (max_t - t_a) * inv_T + (log(sum_t) - log(sum_s));
  const bool ruled_out = t_a == -std::numeric_limits<acc_t>::infinity() ||
                         (cross != cross && sum_s == sum_s && sum_t == sum_t);
  if (ruled_out) rkl = std::numeric_limits<acc_t>::infinity();
  ReverseKLRow<acc_t> out;
  out.loss = T * T * rkl;
  out.a = T * scale / sum_s;
  out.b = cross / sum_s;
  return out;
}

// Kernels that keep running statistics (CUDA, Triton): the reverse-KL cross accumulated
// against the anchor (s_a = ref_old, t_a = t_old) re-centred on a new one (ref_new, t_new):
//   d' = d - ((ref_new - ref_old) - (t_new - t_old))/T,  e^ys' = f e^ys (f: sum_s's rescale),
//   so cross' = f (cross - sum_s ((ref_new - ref_old) - (t_new - t_old))/T).
// Nothing accumulated yet (sum_s == 0) needs nothing.
template <typename acc_t>
KDFAST_HD acc_t reverse_kl_recentre(acc_t cross, acc_t sum_s, acc_t ref_old, acc_t t_old, acc_t ref_new, acc_t t_new,
                                    acc_t inv_T, acc_t f) {
  if (sum_s == acc_t(0)) return acc_t(0);
  return f * (cross - sum_s * ((ref_new - ref_old) - (t_new - t_old)) * inv_T);
}

// What a divergence is multiplied by at temperature T (loss) and what its gradient
// w.r.t. the logits s is then multiplied by (the 1/T of z = s/T folded in).
template <typename acc_t>
KDFAST_HD acc_t divergence_loss_scale(Divergence d, acc_t T) {
  return d == Divergence::TVD ? T : T * T;
}

template <typename acc_t>
KDFAST_HD acc_t divergence_grad_scale(Divergence d, acc_t T) {
  return d == Divergence::TVD ? acc_t(1) : T;
}

// Top-k: the teacher's tail class p_tail = max(0, 1 - sum_K p) as a log-probability, and the
// student's log q_tail = log(Z_tail / Z_s) (-inf for an empty tail).
template <typename acc_t>
KDFAST_HD acc_t topk_teacher_log_tail(acc_t sum_p) {
  const acc_t tail = acc_t(1) - sum_p;
  return tail > acc_t(0) ? log(tail) : -std::numeric_limits<acc_t>::infinity();
}

}  // namespace kdfast
