// Math of fused attention transfer, shared by the CPU and CUDA kernels.
//
// Attention transfer (Zagoruyko & Komodakis 2017) as fasterai computes it, per layer pair.
// A feature map f is [B, C, X] (X = H*W positions, any strides); per sample b
//   r_b[x] = (1/C) sum_c f[b,c,x]^p                     mean over channels
//   n_b    = ||r_b||_2,   a_b = r_b / max(n_b, eps)      F.normalize, eps = 1e-12
//   loss   = 1/(B X) sum_{b,x} (a_s[b,x] - a_t[b,x])^2  mse_loss (pairs are summed)
// Student and teacher may have different C; only the student gets a gradient.
//
// Backward, per sample (d = a_s - a_t):
//   g_a    = dL/da_s = 2 d / (B X) * grad_loss
//   dL/dr  = (g_a - a_s <a_s, g_a>) / n_s   when n_s > eps: the Jacobian of r -> r/|r| is
//            (I - a a^T) / n;  g_a / eps otherwise (the clamp is a constant)
//   dL/df[b,c,x] = dL/dr[b,x] * p f[b,c,x]^(p-1) / C          (p = 2: 2 f / C)
// The forward pass keeps w_b[x] = dL/dr_b[x] for grad_loss = 1, one [B, X] map per pair,
// so that the backward pass reads f_s once and writes its gradient once:
//   grad[b,c,x] = (grad_loss * p / C) * w[b,x] * f^(p-1).
// Per sample, from the two channel means r_s, r_t (X values each, on chip or in cache):
//   pass 1: |r_s|^2, |r_t|^2;  pass 2: sum d^2 and <a_s, d>;  pass 3: w.
// The loss is summed from explicit differences d, not from |a_s|^2 + |a_t|^2 - 2<a_s, a_t>,
// which cancels catastrophically when the maps are close (the usual case in training).
#pragma once
#include <math.h>

#include "host_device.h"

namespace kdfast {

constexpr double kAttentionEps = 1e-12;  // F.normalize's default

// How f^p is computed: p == 2 exactly (the default; f*f, gradient 2f) or any p > 0 with
// torch.pow's semantics (negative f: a real result for integer p, NaN otherwise): integer
// exponents up to kMaxIntPower by repeated squaring (a few multiplies), others through pow.
enum class AttentionPower : int {
  Square = 0,
  General = 1,
};

inline AttentionPower attention_power(double p) {
  return p == 2.0 ? AttentionPower::Square : AttentionPower::General;
}

constexpr int kMaxIntPower = 64;

// The exponent e as an integer for repeated squaring, or -1 to use pow.
KDFAST_HD int integer_power(double e) {
  return e >= 0 && e <= kMaxIntPower && e == static_cast<double>(static_cast<int>(e)) ? static_cast<int>(e) : -1;
}

KDFAST_HD float pow_(float x, float y) { return powf(x, y); }
KDFAST_HD double pow_(double x, double y) { return pow(x, y); }

template <typename acc_t>
KDFAST_HD acc_t ipow_(acc_t x, int n) {  // x^n, n >= 0 (x^0 = 1, as pow)
  acc_t r = acc_t(1);
  while (n > 0) {
    if (n & 1) r *= x;
    x *= x;
    n >>= 1;
  }
  return r;
}

// f^e for the general power: e_int = integer_power(e).
template <typename acc_t>
KDFAST_HD acc_t general_power(acc_t f, acc_t e, int e_int) {
  return e_int >= 0 ? ipow_(f, e_int) : pow_(f, e);
}

// f^p
template <AttentionPower P, typename acc_t>
KDFAST_HD acc_t attention_power_of(acc_t f, acc_t p, int p_int) {
  if constexpr (P == AttentionPower::Square) {
    return f * f;
  } else {
    return general_power(f, p, p_int);
  }
}

// f^(p-1): the gradient of f^p without its factor p (folded into the per-map constant).
template <AttentionPower P, typename acc_t>
KDFAST_HD acc_t attention_power_grad(acc_t f, acc_t p_minus_1, int pm1_int) {
  if constexpr (P == AttentionPower::Square) {
    return f;
  } else {
    return general_power(f, p_minus_1, pm1_int);
  }
}

// Per-sample constants from pass 1 (squared norms of the two channel means).
template <typename acc_t>
struct AttentionSampleNorms {
  acc_t inv_s, inv_t;  // 1 / max(n, eps)
  bool s_above_eps;    // n_s > eps: the normalisation's Jacobian applies
};

template <typename acc_t>
KDFAST_HD AttentionSampleNorms<acc_t> attention_sample_norms(acc_t sumsq_s, acc_t sumsq_t) {
  const acc_t eps = acc_t(kAttentionEps);
  const acc_t n_s = sqrt(sumsq_s), n_t = sqrt(sumsq_t);
  AttentionSampleNorms<acc_t> out;
  out.s_above_eps = n_s > eps;
  out.inv_s = acc_t(1) / (n_s > eps ? n_s : eps);
  out.inv_t = acc_t(1) / (n_t > eps ? n_t : eps);
  return out;
}

// w[x] = dL/dr_s[x] (grad_loss = 1) from pass 2's <a_s, d>; scale = 2 / (B X).
// Returns (d - [n_s > eps] a_s <a_s, d>) * scale / max(n_s, eps) as  coef_d * d + coef_a * a_s.
template <typename acc_t>
struct AttentionMapCoefs {
  acc_t coef_d, coef_a;
};

template <typename acc_t>
KDFAST_HD AttentionMapCoefs<acc_t> attention_map_coefs(const AttentionSampleNorms<acc_t>& nrm,
                                                       acc_t dot_a_d, acc_t scale) {
  AttentionMapCoefs<acc_t> c;
  c.coef_d = scale * nrm.inv_s;
  c.coef_a = nrm.s_above_eps ? -scale * nrm.inv_s * dot_a_d : acc_t(0);
  return c;
}

}  // namespace kdfast
