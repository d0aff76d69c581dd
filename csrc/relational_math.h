// Element math of the relational losses (RKD distance and angle, PKT, similarity
// preserving), shared by the CPU and CUDA kernels. Everything is computed from the Gram
// matrices G = E E^T of the student and the teacher ([B, B], fp32 or fp64); the kernels
// return the loss and S = dL/dG + (dL/dG)^T, so that dL/dE = S E is one matmul.
//
// RKD (Park et al. 2019) on the Gram of the centred embeddings X = E - mean(E) (distances
// and angles do not change; large common offsets no longer cancel in G):
//   d2_ij = G_ii + G_jj - 2 G_ij;  a pair is coincident (duplicate samples) when
//           d2_ij <= tol (G_ii + G_jj), tol a few roundings of G: then d2_ij = 0.
//   distance  d_ij = sqrt(max(d2_ij, 1e-12)), d_ii = 0 (pdist's clamp, diagonal 0);
//             mu = mean of d over i != j; L_D = mean_ij smooth_l1(d_s/mu_s - d_t/mu_t).
//   angle     u_ij = 1 / max(sqrt(d2_ij), 1e-12), 0 when coincident or i = j
//             (F.normalize of x_j - x_i with eps 1e-12: the zero vector for duplicates);
//             a_ijk = <x_j - x_i, x_k - x_i> u_ij u_ik
//                   = (G_jk - G_ij - G_ik + G_ii) u_ij u_ik
//                   = u_ik (u_ij (G_jk - G_ik) + beta_ij),   beta_ij = u_ij (G_ii - G_ij);
//             L_A = mean_ijk smooth_l1(a^s_ijk - a^t_ijk).
//   Gradient, with c_ijk = smooth_l1'(a^s - a^t) and N_ijk = G_jk - G_ij - G_ik + G_ii:
//     q_ijk = c_ijk u_ij u_ik = dL/dN_ijk (times B^3);   P_jk = sum_i q_ijk,
//     R_ij = sum_k q_ijk,   T_ij = sum_k c_ijk a^s_ijk,
//     dL/dd2_ij (through u_ij, since du/dd2 = -u^3/2 and a is symmetric in j, k)
//            = -T_ij u_ij^2 (/ B^3);
//     distance: dL/dd_ij = (w_ij - K) / mu_s,  w_ij = smooth_l1'(rho_ij)/B^2 for
//            rho = d_s/mu_s - d_t/mu_t, K = sum w d_s/mu_s / (B(B-1)) (mu's own gradient);
//            dL/dd2_ij = dL/dd_ij / (2 d_ij), 0 in pdist's clamp and for coincident pairs.
//   With f_ij the total dL/dd2_ij of the ordered pair (i, j) and d2_ij = G_ii + G_jj - 2 G_ij,
//   N as above, S = dG + dG^T is
//     S_ij = P_ij + P_ji - 2 (R_ij + R_ji) - 2 (f_ij + f_ji)        (i != j)
//     S_ii = 2 P_ii + 2 sum_j R_ij + 2 sum_{j != i} (f_ij + f_ji)
//   (P, R scaled by angle_weight / B^3). Every row of S sums to zero, as the loss does not
//   move when all samples are shifted: S X = S E, so the centring needs no term of its own.
//
// PKT (Passalis & Tefas 2018) on the Gram of E itself (cosines are not shift invariant):
//   c_i = 1 / (sqrt(G_ii) + eps), 0 when the norm is not finite (the reference's
//   nan_to_num zeroes such rows); K_ij = (G_ij c_i c_j + 1) / 2; r_i = sum_j K_ij;
//   P_ij = K_ij / r_i; L = mean_ij Pt_ij log((Pt_ij + eps) / (Ps_ij + eps)).
//   pi_ij = dL/dPs_ij = -Pt_ij / (Ps_ij + eps) / B^2; sigma_i = sum_j pi_ij Ps_ij;
//   kappa_ij = dL/dK_ij = (pi_ij - sigma_i) / r_i;  m_ij = (kappa_ij + kappa_ji) / 2;
//   lambda_i = dL/dc_i = sum_j m_ij G_ij c_j;  dc_i/dG_ii = -c_i^2 / (2 sqrt(G_ii));
//   S_ij = m_ij c_i c_j,   S_ii += -lambda_i c_i^2 / sqrt(G_ii).
//
// Similarity preserving (Tung & Mori 2019, fasterai's form) on the Gram of E:
//   nu_i = ||G_i.||_p, g_ij = G_ij / max(nu_i, 1e-12); L = mean_ij (gs_ij - gt_ij)^2.
//   gamma_ij = 2 (gs_ij - gt_ij) / B^2; sigma_i = sum_j gamma_ij gs_ij;
//   dL/dG_ij = (gamma_ij - sigma_i sign(g_ij) |g_ij|^(p-1)) / nu_i   (nu_i >= 1e-12),
//              gamma_ij / 1e-12 otherwise;   S_ij = dL/dG_ij + dL/dG_ji.
//
// Comparisons are written so that NaN propagates (x < lo ? lo : x keeps a NaN x).
#pragma once
#include <cmath>

#include "host_device.h"

namespace kdfast {
#if !defined(__CUDACC__)
using std::fabs;
using std::log;
using std::pow;
using std::sqrt;
#endif

constexpr double kPdistMinSquared = 1e-12;  // pdist's clamp of squared distances
constexpr double kNormalizeEps = 1e-12;     // F.normalize's eps

// smooth_l1' (beta 1): x clamped to [-1, 1].
template <typename acc_t>
KDFAST_HD acc_t smooth_l1_grad(acc_t x) {
  return x < acc_t(-1) ? acc_t(-1) : (x > acc_t(1) ? acc_t(1) : x);
}

// smooth_l1 (beta 1) from x and c = smooth_l1'(x): 0.5 x^2 for |x| < 1, |x| - 0.5 otherwise.
template <typename acc_t>
KDFAST_HD acc_t smooth_l1_from_grad(acc_t x, acc_t c) {
  return c * (x - acc_t(0.5) * c);
}

// What RKD keeps of a pair: the squared distance (0 when coincident) and u = 1/|x_j - x_i|.
template <typename acc_t>
struct RkdPair {
  acc_t d2, u, beta;
};

template <typename acc_t>
KDFAST_HD RkdPair<acc_t> rkd_pair(acc_t g_ii, acc_t g_jj, acc_t g_ij, bool diagonal, acc_t tol) {
  RkdPair<acc_t> p{acc_t(0), acc_t(0), acc_t(0)};
  if (diagonal) return p;
  acc_t d2 = g_ii + g_jj - acc_t(2) * g_ij;
  if (d2 <= tol * (g_ii + g_jj)) d2 = acc_t(0);  // coincident: within G's rounding of 0
  p.d2 = d2;
  if (d2 != acc_t(0)) {
    const acc_t norm = sqrt(d2);
    p.u = acc_t(1) / (norm < acc_t(kNormalizeEps) ? acc_t(kNormalizeEps) : norm);
  }
  p.beta = p.u * (g_ii - g_ij);
  return p;
}

// pdist's distance from the kept squared distance (the diagonal has d2 = 0 and is masked
// by the caller).
template <typename acc_t>
KDFAST_HD acc_t rkd_distance(acc_t d2) {
  return sqrt(d2 < acc_t(kPdistMinSquared) ? acc_t(kPdistMinSquared) : d2);
}

// d(distance)/d(d2): 0 inside pdist's clamp (coincident pairs have d2 = 0).
template <typename acc_t>
KDFAST_HD acc_t rkd_distance_grad(acc_t d2, acc_t d) {
  return d2 < acc_t(kPdistMinSquared) ? acc_t(0) : acc_t(0.5) / d;
}

// a_ijk from the Gram entries G_jk, G_ik and the pair values of (i, j) and (i, k).
template <typename acc_t>
KDFAST_HD acc_t rkd_angle(acc_t g_jk, acc_t g_ik, acc_t u_ij, acc_t beta_ij, acc_t u_ik) {
  return u_ik * (u_ij * (g_jk - g_ik) + beta_ij);
}

// The distance loss's dL/dd2 of the ordered pair (i, j), unweighted; d2s, d2t the kept
// squared distances, mu_s, mu_t the mean distances, K as above, inv_b2 = 1/B^2.
template <typename acc_t>
KDFAST_HD acc_t rkd_distance_pair_grad(acc_t d2s, acc_t d2t, acc_t mu_s, acc_t mu_t, acc_t K,
                                       acc_t inv_b2) {
  const acc_t ds = rkd_distance(d2s);
  const acc_t w = smooth_l1_grad(ds / mu_s - rkd_distance(d2t) / mu_t) * inv_b2;
  return (w - K) / mu_s * rkd_distance_grad(d2s, ds);
}

// PKT's c_i = 1 / (|e_i| + eps), or 0 for a row whose norm is not finite.
template <typename acc_t>
KDFAST_HD acc_t pkt_inv_norm(acc_t g_ii, acc_t eps) {
  const acc_t n = sqrt(g_ii);
  return n - n == acc_t(0) ? acc_t(1) / (n + eps) : acc_t(0);  // n - n is NaN for inf and NaN
}

// PKT's kernel value K_ij = (cos_ij + 1) / 2, with zeroed rows giving cos = 0.
template <typename acc_t>
KDFAST_HD acc_t pkt_kernel(acc_t g_ij, acc_t c_i, acc_t c_j) {
  const acc_t cosine = (c_i == acc_t(0) || c_j == acc_t(0)) ? acc_t(0) : g_ij * c_i * c_j;
  return (cosine + acc_t(1)) * acc_t(0.5);
}

// PKT's pi_ij = dL/dPs_ij (times B^2) and the loss term, from the two probabilities.
template <typename acc_t>
KDFAST_HD acc_t pkt_loss_term(acc_t pt, acc_t ps, acc_t eps) {
  return pt * log((pt + eps) / (ps + eps));
}

// Similarity: |x|^p summed for the p-norm, and sign(x) |x|^(p-1) = d|x|^p/dx / p.
template <typename acc_t>
KDFAST_HD acc_t abs_pow(acc_t x, acc_t p) {
  const acc_t a = fabs(x);
  if (p == acc_t(2)) return a * a;
  if (p == acc_t(1)) return a;
  return pow(a, p);
}

template <typename acc_t>
KDFAST_HD acc_t p_norm_from_sum(acc_t sum, acc_t p) {
  if (p == acc_t(2)) return sqrt(sum);
  if (p == acc_t(1)) return sum;
  return pow(sum, acc_t(1) / p);
}

template <typename acc_t>
KDFAST_HD acc_t signed_pow_grad(acc_t x, acc_t p) {
  if (p == acc_t(2)) return x;
  if (x == acc_t(0)) return acc_t(0);
  const acc_t s = x > acc_t(0) ? acc_t(1) : acc_t(-1);
  if (p == acc_t(1)) return s;
  return s * pow(fabs(x), p - acc_t(1));
}

template <typename acc_t>
KDFAST_HD acc_t normalize_denominator(acc_t norm) {
  return norm < acc_t(kNormalizeEps) ? acc_t(kNormalizeEps) : norm;
}

// Similarity's dL/dG_ij from row i's values: gamma_ij, the normalised entry g_ij, sigma_i,
// the row's p-norm and 1 / max(norm, 1e-12) (inside normalize's clamp the norm is constant).
template <typename acc_t>
KDFAST_HD acc_t similarity_grad(acc_t gamma_ij, acc_t g_hat_ij, acc_t sigma_i, acc_t norm_i, acc_t inv_den_i,
                                acc_t p) {
  return (norm_i < acc_t(kNormalizeEps) ? gamma_ij : gamma_ij - sigma_i * signed_pow_grad(g_hat_ij, p)) * inv_den_i;
}

}  // namespace kdfast
