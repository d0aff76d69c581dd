// Relational losses on the CPU, from the two Gram matrices (math: relational_math.h),
// compiled once per instruction set (csrc/cpu/dispatch.h).
//
// The B x B stages (pair values, distance loss, PKT and similarity rows, assembling S)
// run one row per task. The RKD angle term is the only B^3 part: one task per row j of
// P walks every apex i and, vectorized over k, adds q_ijk to P_jk (a row that stays in
// L1), sums it into R_ij and c a^s into T_ij; so each output has one writer and nothing
// is reduced across threads. Scratch: a handful of [B, B] tensors, no [B, B, D].
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>

#include "cpu/dispatch.h"
#include "cpu/vec.h"
#include "relational.h"

namespace kdfast {
inline namespace CPU_CAPABILITY {
namespace {

// Rows per task: 64k elements or more each (a B x B pass at B = 128 is ~20 us of work:
// threads would only cost their start and the wait for a busy core).
int64_t row_grain(int64_t B) { return std::max<int64_t>(1, 65536 / B); }

template <typename acc_t>
acc_t sum_of(const at::Tensor& rows) {  // in order: results do not depend on the threads
  const acc_t* r = cdata<acc_t>(rows);
  acc_t total = 0;
  for (int64_t i = 0; i < rows.numel(); ++i) total += r[i];
  return total;
}

// One model's RKD pair values.
template <typename acc_t>
struct RkdSide {
  at::Tensor d2, u, beta;  // [B, B]
  acc_t mu = 0;            // mean distance over i != j
};

template <typename acc_t>
RkdSide<acc_t> rkd_pairs(const at::Tensor& gram, acc_t tol) {
  const int64_t B = gram.size(0);
  RkdSide<acc_t> side{at::empty({B, B}, gram.options()), at::empty({B, B}, gram.options()),
                      at::empty({B, B}, gram.options())};
  at::Tensor row_sum = at::empty({B}, gram.options());
  const acc_t* G = cdata<acc_t>(gram);
  acc_t *d2 = mdata<acc_t>(side.d2), *u = mdata<acc_t>(side.u);
  acc_t *beta = mdata<acc_t>(side.beta), *rs = mdata<acc_t>(row_sum);
  at::parallel_for(0, B, row_grain(B), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t sum = 0;
      for (int64_t j = 0; j < B; ++j) {
        const auto p = rkd_pair<acc_t>(G[i * B + i], G[j * B + j], G[i * B + j], i == j, tol);
        d2[i * B + j] = p.d2;
        u[i * B + j] = p.u;
        beta[i * B + j] = p.beta;
        if (i != j) sum += rkd_distance(p.d2);
      }
      rs[i] = sum;
    }
  });
  side.mu = sum_of<acc_t>(row_sum) / acc_t(B * (B - 1));
  return side;
}

// The distance loss (unweighted) and K = sum_ij w_ij d^s_ij / mu_s / (B (B - 1)).
template <typename acc_t>
std::pair<acc_t, acc_t> rkd_distance_loss(const RkdSide<acc_t>& s, const RkdSide<acc_t>& t) {
  const int64_t B = s.d2.size(0);
  at::Tensor loss_rows = at::empty({B}, s.d2.options()), k_rows = at::empty({B}, s.d2.options());
  const acc_t *d2s = cdata<acc_t>(s.d2), *d2t = cdata<acc_t>(t.d2);
  acc_t *lr = mdata<acc_t>(loss_rows), *kr = mdata<acc_t>(k_rows);
  at::parallel_for(0, B, row_grain(B), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t loss = 0, k = 0;
      for (int64_t j = 0; j < B; ++j) {
        if (j == i) continue;
        const acc_t rho_s = rkd_distance(d2s[i * B + j]) / s.mu;
        const acc_t x = rho_s - rkd_distance(d2t[i * B + j]) / t.mu;
        const acc_t c = smooth_l1_grad(x);
        loss += smooth_l1_from_grad(x, c);
        k += c * rho_s;
      }
      lr[i] = loss;
      kr[i] = k;
    }
  });
  const acc_t inv_b2 = acc_t(1) / acc_t(B * B);
  return {sum_of<acc_t>(loss_rows) * inv_b2, sum_of<acc_t>(k_rows) * inv_b2 / acc_t(B * (B - 1))};
}

// The angle term: returns sum_ijk smooth_l1 and fills P, R, T (unscaled, see the header).
template <typename acc_t>
acc_t rkd_angle_sums(const at::Tensor& gs, const at::Tensor& gt, const RkdSide<acc_t>& s,
                     const RkdSide<acc_t>& t, at::Tensor& P, at::Tensor& R, at::Tensor& T) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t K = Vec::size();
  const int64_t B = gs.size(0);
  const acc_t *Gs = cdata<acc_t>(gs), *Gt = cdata<acc_t>(gt);
  const acc_t *Us = cdata<acc_t>(s.u), *Ut = cdata<acc_t>(t.u);
  const acc_t *Bs = cdata<acc_t>(s.beta), *Bt = cdata<acc_t>(t.beta);
  acc_t *p = mdata<acc_t>(P), *r = mdata<acc_t>(R), *tt = mdata<acc_t>(T);
  at::Tensor loss_rows = at::empty({B}, gs.options());
  acc_t* lr = mdata<acc_t>(loss_rows);
  const Vec one(1), minus_one(-1), half(0.5);
  at::parallel_for(0, B, row_grain(B * B), [&](int64_t begin, int64_t end) {  // 64k triplets or more a task
    for (int64_t j = begin; j < end; ++j) {
      acc_t* Pj = p + j * B;
      std::fill(Pj, Pj + B, acc_t(0));
      Vec loss(0);
      for (int64_t i = 0; i < B; ++i) {
        const int64_t ij = i * B + j;
        const acc_t us_ij = Us[ij], ut_ij = Ut[ij];
        if (us_ij == acc_t(0) && ut_ij == acc_t(0)) {  // i = j, or duplicates in both: all a = 0
          r[ij] = tt[ij] = 0;
          continue;
        }
        const Vec vus_ij(us_ij), vut_ij(ut_ij), vbs_ij(Bs[ij]), vbt_ij(Bt[ij]);
        const acc_t *Gs_j = Gs + j * B, *Gs_i = Gs + i * B, *Us_i = Us + i * B;
        const acc_t *Gt_j = Gt + j * B, *Gt_i = Gt + i * B, *Ut_i = Ut + i * B;
        Vec r_acc(0), t_acc(0);
        for (int64_t k = 0; k < B; k += K) {
          const int64_t n = std::min(K, B - k);  // short loads fill the other lanes with 0
          const Vec us_ik = Vec::loadu(Us_i + k, n), ut_ik = Vec::loadu(Ut_i + k, n);
          const Vec a_s = us_ik * (vus_ij * (Vec::loadu(Gs_j + k, n) - Vec::loadu(Gs_i + k, n)) + vbs_ij);
          const Vec a_t = ut_ik * (vut_ij * (Vec::loadu(Gt_j + k, n) - Vec::loadu(Gt_i + k, n)) + vbt_ij);
          const Vec x = a_s - a_t;
          const Vec c = at::vec::clamp(x, minus_one, one);  // NaN stays NaN
          loss = loss + c * (x - half * c);
          const Vec q = c * us_ik * vus_ij;
          (Vec::loadu(Pj + k, n) + q).store(Pj + k, n);
          r_acc = r_acc + q;
          t_acc = t_acc + c * a_s;
        }
        r[ij] = reduce_sum(r_acc);
        tt[ij] = reduce_sum(t_acc);
      }
      lr[j] = reduce_sum(loss);
    }
  });
  return sum_of<acc_t>(loss_rows);
}

// The frame every relational CPU kernel shares: checked contiguous Grams, S, one dispatch
// on their dtype. body(acc_t(0), g) fills g.S (with compute_grad) and returns the loss.
template <typename Body>
std::tuple<at::Tensor, at::Tensor> gram_loss_cpu(const at::Tensor& g_s, const at::Tensor& g_t, bool compute_grad,
                                                 const char* op, const Body& body) {
  const GramProblem g = prepare_grams(g_s, g_t, compute_grad, op);
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES(g.gs.scalar_type(), "relational_gram_cpu",
                             [&] { loss = at::scalar_tensor(body(scalar_t(0), g), g.gs.options()); });
  return {loss, g.S};
}

std::tuple<at::Tensor, at::Tensor> rkd_gram_cpu(const at::Tensor& g_s, const at::Tensor& g_t, double dist_weight,
                                                double angle_weight, double tol, bool compute_grad) {
  return gram_loss_cpu(g_s, g_t, compute_grad, "rkd_gram", [&](auto zero, const GramProblem& g) {
    using acc_t = decltype(zero);
    const at::Tensor &gs = g.gs, &gt = g.gt, &S = g.S;
    const int64_t B = g.B;
    const auto s = rkd_pairs<acc_t>(gs, tol), t = rkd_pairs<acc_t>(gt, tol);
    const bool with_distance = dist_weight != 0, with_angle = angle_weight != 0;
    const acc_t wd = dist_weight, inv_b2 = acc_t(1) / acc_t(B * B);
    const acc_t wa_b3 = angle_weight / (double(B) * double(B) * double(B));
    acc_t total = 0, K = 0;
    if (with_distance) {
      const auto [loss_d, k] = rkd_distance_loss(s, t);
      total += wd * loss_d;
      K = k;
    }
    at::Tensor P, R, T;
    if (with_angle) {
      P = at::empty({B, B}, gs.options());
      R = at::empty({B, B}, gs.options());
      T = at::empty({B, B}, gs.options());
      total += wa_b3 * rkd_angle_sums(gs, gt, s, t, P, R, T);
    }
    if (!compute_grad) return total;
    const acc_t *d2s = cdata<acc_t>(s.d2), *d2t = cdata<acc_t>(t.d2);
    const acc_t* us = cdata<acc_t>(s.u);
    const acc_t* p = with_angle ? cdata<acc_t>(P) : nullptr;
    const acc_t* r = with_angle ? cdata<acc_t>(R) : nullptr;
    const acc_t* tt = with_angle ? cdata<acc_t>(T) : nullptr;
    acc_t* out = mdata<acc_t>(S);
    // f_ij = dL/dd2 of the ordered pair (i, j).
    auto pair_grad = [&](int64_t i, int64_t j) {
      const int64_t ij = i * B + j;
      acc_t f = 0;
      if (with_distance) f += wd * rkd_distance_pair_grad(d2s[ij], d2t[ij], s.mu, t.mu, K, inv_b2);
      if (with_angle) f -= wa_b3 * tt[ij] * us[ij] * us[ij];
      return f;
    };
    at::parallel_for(0, B, row_grain(B), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t sum_f = 0, sum_r = 0;
        for (int64_t j = 0; j < B; ++j) {
          if (j == i) continue;
          const int64_t ij = i * B + j, ji = j * B + i;
          const acc_t f = pair_grad(i, j) + pair_grad(j, i);
          acc_t value = -2 * f;
          if (with_angle) {
            value += wa_b3 * (p[ij] + p[ji] - 2 * (r[ij] + r[ji]));
            sum_r += r[ij];
          }
          out[ij] = value;
          sum_f += f;
        }
        out[i * B + i] = 2 * sum_f + (with_angle ? wa_b3 * 2 * (p[i * B + i] + sum_r) : acc_t(0));
      }
    });
    return total;
  });
}

std::tuple<at::Tensor, at::Tensor> pkt_gram_cpu(const at::Tensor& g_s, const at::Tensor& g_t, double eps_in,
                                                bool compute_grad) {
  return gram_loss_cpu(g_s, g_t, compute_grad, "pkt_gram", [&](auto zero, const GramProblem& g) {
    using acc_t = decltype(zero);
    const at::Tensor &gs = g.gs, &gt = g.gt, &S = g.S;
    const int64_t B = g.B;
    using Vec = Vectorized<acc_t>;
    constexpr int64_t K = Vec::size();
    const acc_t eps = eps_in, inv_b2 = acc_t(1) / acc_t(B * B);
    // Per row: c (inverse norms) of student and teacher, the loss row.
    at::Tensor rows = at::empty({3, B}, gs.options());
    acc_t *cs = mdata<acc_t>(rows), *ct = cs + B, *loss_rows = cs + 2 * B;
    // The conditional probabilities of both models, then kappa = dL/dK in the student's.
    at::Tensor probs = at::empty({2, B, B}, gs.options());
    acc_t *Ps = mdata<acc_t>(probs), *Pt = Ps + B * B;
    const acc_t *Gs = cdata<acc_t>(gs), *Gt = cdata<acc_t>(gt);
    for (int64_t i = 0; i < B; ++i) {
      cs[i] = pkt_inv_norm(Gs[i * B + i], eps);
      ct[i] = pkt_inv_norm(Gt[i * B + i], eps);
    }
    at::parallel_for(0, B, row_grain(B), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t *ps = Ps + i * B, *pt = Pt + i * B;
        acc_t sum_s = 0, sum_t = 0;
        for (int64_t j = 0; j < B; ++j) {
          ps[j] = pkt_kernel(Gs[i * B + j], cs[i], cs[j]);
          pt[j] = pkt_kernel(Gt[i * B + j], ct[i], ct[j]);
          sum_s += ps[j];
          sum_t += pt[j];
        }
        const Vec inv_s(acc_t(1) / sum_s), inv_t(acc_t(1) / sum_t), veps(eps);
        Vec loss(0), sigma(0);
        for (int64_t j = 0; j < B; j += K) {  // pt log((pt + eps) / (ps + eps)), pi = -pt / (ps + eps)
          const int64_t n = std::min(K, B - j);
          const Vec p_s = Vec::loadu(ps + j, n) * inv_s, p_t = Vec::loadu(pt + j, n) * inv_t;
          p_s.store(ps + j, n);
          p_t.store(pt + j, n);
          loss = loss + p_t * ((p_t + veps) / (p_s + veps)).log();
          sigma = sigma - p_t / (p_s + veps) * p_s;
        }
        loss_rows[i] = reduce_sum(loss);
        // kappa_ij = dL/dK_ij = (pi_ij - sigma_i) / r_i, over the student's probabilities
        const acc_t sig = reduce_sum(sigma) * inv_b2, inv_r = acc_t(1) / sum_s;
        for (int64_t j = 0; j < B; ++j) ps[j] = (-pt[j] / (ps[j] + eps) * inv_b2 - sig) * inv_r;
      }
    });
    const acc_t loss = sum_of<acc_t>(rows[2]) * inv_b2;
    if (!compute_grad) return loss;
    const acc_t* kappa = Ps;
    acc_t* out = mdata<acc_t>(S);
    at::parallel_for(0, B, row_grain(B), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t lambda = 0;
        for (int64_t j = 0; j < B; ++j) {
          const acc_t m = acc_t(0.5) * (kappa[i * B + j] + kappa[j * B + i]);  // dL/dcos_ij, symmetrised
          out[i * B + j] = m * cs[i] * cs[j];
          if (cs[j] != acc_t(0)) lambda += m * Gs[i * B + j] * cs[j];
        }
        const acc_t norm = sqrt(Gs[i * B + i]);
        if (cs[i] != acc_t(0) && norm > acc_t(0)) out[i * B + i] -= lambda * cs[i] * cs[i] / norm;
      }
    });
    return loss;
  });
}

std::tuple<at::Tensor, at::Tensor> similarity_gram_cpu(const at::Tensor& g_s, const at::Tensor& g_t, double p_in,
                                                       bool compute_grad) {
  return gram_loss_cpu(g_s, g_t, compute_grad, "similarity_gram", [&](auto zero, const GramProblem& g) {
    using acc_t = decltype(zero);
    const at::Tensor &gs = g.gs, &gt = g.gt, &S = g.S;
    const int64_t B = g.B;
    const acc_t p = p_in, inv_b2 = acc_t(1) / acc_t(B * B);
    at::Tensor loss_rows = at::empty({B}, gs.options());
    // The student's normalised rows, then dL/dG.
    at::Tensor work = at::empty({B, B}, gs.options());
    acc_t *lr = mdata<acc_t>(loss_rows), *dG = mdata<acc_t>(work);
    const acc_t *Gs = cdata<acc_t>(gs), *Gt = cdata<acc_t>(gt);
    at::parallel_for(0, B, row_grain(B), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t *gs_i = Gs + i * B, *gt_i = Gt + i * B;
        acc_t* d = dG + i * B;
        acc_t sum_s = 0, sum_t = 0;
        for (int64_t j = 0; j < B; ++j) {
          sum_s += abs_pow(gs_i[j], p);
          sum_t += abs_pow(gt_i[j], p);
        }
        const acc_t norm_s = p_norm_from_sum(sum_s, p);
        const acc_t inv_s = acc_t(1) / normalize_denominator(norm_s);
        const acc_t inv_t = acc_t(1) / normalize_denominator(p_norm_from_sum(sum_t, p));
        acc_t loss = 0, sigma = 0;
        for (int64_t j = 0; j < B; ++j) {
          const acc_t hs = gs_i[j] * inv_s, diff = hs - gt_i[j] * inv_t;
          loss += diff * diff;
          sigma += diff * hs;
          d[j] = hs;
        }
        lr[i] = loss;
        if (!compute_grad) continue;
        const acc_t two_inv_b2 = 2 * inv_b2;
        sigma *= two_inv_b2;
        for (int64_t j = 0; j < B; ++j) {
          d[j] = similarity_grad((d[j] - gt_i[j] * inv_t) * two_inv_b2, d[j], sigma, norm_s, inv_s, p);
        }
      }
    });
    const acc_t loss = sum_of<acc_t>(loss_rows) * inv_b2;
    if (!compute_grad) return loss;
    acc_t* out = mdata<acc_t>(S);
    at::parallel_for(0, B, row_grain(B), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t j = 0; j < B; ++j) out[i * B + j] = dG[i * B + j] + dG[j * B + i];
      }
    });
    return loss;
  });
}

}  // namespace

extern const RelationalKernels kRelationalKernels;
const RelationalKernels kRelationalKernels{&rkd_gram_cpu, &pkt_gram_cpu, &similarity_gram_cpu};

}  // namespace CPU_CAPABILITY
}  // namespace kdfast
