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

}  // namespace kdfast
