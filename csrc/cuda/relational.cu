// Relational losses on CUDA, from the two Gram matrices (math: relational_math.h; the
// same stages as csrc/cpu/relational.cpp and kdfast/triton/relational.py).
//
// B x B stages: one block per row, block reductions in shared memory. The RKD angle term
// (B^3 triplets) runs as two register-tiled kernels, each reducing along one axis of the
// [i, j, k] cube so that every output has one writer (no atomics, deterministic):
//   rkd_angle_rows: 64 x 64 tiles of (i, j), walking k -> R_ij, T_ij, the loss;
//   rkd_angle_cols: 64 x 64 tiles of (j, k) with j-tile <= k-tile (P is symmetric),
//                   walking the apex i -> P_jk.
// Each thread owns a 4 x 4 sub-tile; the operands of a chunk of the reduced axis are
// staged in shared memory ([chunk][64 + 1], padded against bank conflicts).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "relational.h"

namespace kdfast {
namespace {

constexpr int kRowThreads = 256;
constexpr int kTile = 64;          // output tile of the angle kernels
constexpr int kSub = 4;            // per-thread sub-tile: 16 x 16 threads x 4 x 4
constexpr int kTileThreads = kTile / kSub;
constexpr int kTileBlock = kTileThreads * kTileThreads;  // threads of an angle kernel's block
constexpr int kPad = kTile + 1;

// Rows of the reduced axis staged per step: 16 (float) or 8 (double) keeps shared memory
// under 48 KB.
template <typename acc_t>
constexpr int chunk_rows() {
  return sizeof(acc_t) == 4 ? 16 : 8;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the (1-D or 2-D) block, returned to every thread. scratch: 33 shared values.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* scratch) {
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = t & 31, warp = t >> 5, warps = (blockDim.x * blockDim.y + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = warp_sum(lane < warps ? scratch[lane] : acc_t(0));
    if (lane == 0) scratch[32] = v;
  }
  __syncthreads();
  return scratch[32];
}

// smooth_l1' in the B^3 loops: min/max that keep NaN (sm_80+), two instructions instead
// of two compares and two selects.
template <typename acc_t>
__device__ __forceinline__ acc_t clamp_unit(acc_t x) {
  return smooth_l1_grad(x);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
template <>
__device__ __forceinline__ float clamp_unit<float>(float x) {
  float y;
  asm("max.NaN.f32 %0, %1, 0fBF800000;" : "=f"(y) : "f"(x));  // max(x, -1)
  asm("min.NaN.f32 %0, %1, 0f3F800000;" : "=f"(y) : "f"(y));  // min(., 1)
  return y;
}
#endif

// ---------------------------------------------------------------- RKD

template <typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    rkd_pairs_kernel(const acc_t* __restrict__ G, int64_t B, acc_t tol, acc_t* __restrict__ d2,
                     acc_t* __restrict__ u, acc_t* __restrict__ beta, acc_t* __restrict__ row_sum) {
  __shared__ acc_t scratch[33];
  const int64_t i = blockIdx.x;
  const acc_t g_ii = G[i * B + i];
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
    const auto p = rkd_pair<acc_t>(g_ii, G[j * B + j], G[i * B + j], i == j, tol);
    d2[i * B + j] = p.d2;
    u[i * B + j] = p.u;
    beta[i * B + j] = p.beta;
    if (i != j) sum += rkd_distance(p.d2);
  }
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) row_sum[i] = sum;
}

// Rows of smooth_l1(rho) and of smooth_l1'(rho) d_s / mu_s; mu_sums: sums of the distances.
template <typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    rkd_distance_rows_kernel(const acc_t* __restrict__ d2s, const acc_t* __restrict__ d2t, int64_t B,
                             const acc_t* __restrict__ mu_sums, acc_t* __restrict__ loss_rows,
                             acc_t* __restrict__ k_rows) {
  __shared__ acc_t scratch[33];
  const int64_t i = blockIdx.x;
  const acc_t pairs = acc_t(B * (B - 1));
  const acc_t mu_s = mu_sums[0] / pairs, mu_t = mu_sums[1] / pairs;
  acc_t loss = 0, k = 0;
  for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
    if (j == i) continue;
    const acc_t rho_s = rkd_distance(d2s[i * B + j]) / mu_s;
    const acc_t x = rho_s - rkd_distance(d2t[i * B + j]) / mu_t;
    const acc_t c = smooth_l1_grad(x);
    loss += smooth_l1_from_grad(x, c);
    k += c * rho_s;
  }
  loss = block_sum(loss, scratch);
  k = block_sum(k, scratch);
  if (threadIdx.x == 0) {
    loss_rows[i] = loss;
    k_rows[i] = k;
  }
}

struct RkdAngleArgs {
  const void *gs, *gt, *us, *ut, *bs, *bt;
};

// Stages rows [r0, r0 + rows) x columns [c0, c0 + kTile) of a row-major B x B matrix in
// shared memory as tile[row][col], zeros outside the matrix (reads along the rows).
template <typename acc_t, int rows>
__device__ __forceinline__ void stage_rows(acc_t (*tile)[kPad], const acc_t* __restrict__ M, int64_t B,
                                           int64_t r0, int64_t c0) {
  const int t = threadIdx.y * kTileThreads + threadIdx.x;
  for (int e = t; e < rows * kTile; e += kTileBlock) {
    const int r = e / kTile, c = e % kTile;
    const int64_t gr = r0 + r, gc = c0 + c;
    tile[r][c] = (gr < B && gc < B) ? M[gr * B + gc] : acc_t(0);
  }
}

// Stages rows [r0, r0 + kTile) x columns [c0, c0 + cols) transposed, as tile[col][row]
// (reads runs of `cols` along each row).
template <typename acc_t, int cols>
__device__ __forceinline__ void stage_cols(acc_t (*tile)[kPad], const acc_t* __restrict__ M, int64_t B,
                                           int64_t r0, int64_t c0) {
  const int t = threadIdx.y * kTileThreads + threadIdx.x;
  for (int e = t; e < cols * kTile; e += kTileBlock) {
    const int r = e / cols, c = e % cols;  // consecutive threads: consecutive columns of one row
    const int64_t gr = r0 + r, gc = c0 + c;
    tile[c][r] = (gr < B && gc < B) ? M[gr * B + gc] : acc_t(0);
  }
}

// The thread's kSub x kSub register sub-tile of a row-major B x B matrix: rows
// r0 + ty + kTileThreads a, columns c0 + tx + kTileThreads b, zeros outside the matrix.
template <typename acc_t>
__device__ __forceinline__ void load_sub_tile(acc_t (&out)[kSub][kSub], const acc_t* __restrict__ M, int64_t B,
                                              int64_t r0, int64_t c0) {
#pragma unroll
  for (int a = 0; a < kSub; ++a) {
#pragma unroll
    for (int b = 0; b < kSub; ++b) {
      const int64_t r = r0 + threadIdx.y + kTileThreads * a, c = c0 + threadIdx.x + kTileThreads * b;
      out[a][b] = (r < B && c < B) ? M[r * B + c] : acc_t(0);
    }
  }
}

// R_ij = u_ij sum_k c u_ik, T_ij = sum_k c a^s and the tile's loss, over tiles of (i, j).
template <typename acc_t>
__global__ void __launch_bounds__(kTileBlock)
    rkd_angle_rows_kernel(RkdAngleArgs args, int64_t B, acc_t* __restrict__ R, acc_t* __restrict__ T,
                          acc_t* __restrict__ loss_parts) {
  constexpr int KC = chunk_rows<acc_t>();
  __shared__ acc_t gs_ik[KC][kPad], us_ik[KC][kPad], gt_ik[KC][kPad], ut_ik[KC][kPad];
  __shared__ acc_t gs_jk[KC][kPad], gt_jk[KC][kPad];
  __shared__ acc_t scratch[33];
  const acc_t *Gs = static_cast<const acc_t*>(args.gs), *Gt = static_cast<const acc_t*>(args.gt);
  const acc_t *Us = static_cast<const acc_t*>(args.us), *Ut = static_cast<const acc_t*>(args.ut);
  const acc_t *Bs = static_cast<const acc_t*>(args.bs), *Bt = static_cast<const acc_t*>(args.bt);
  const int64_t i0 = int64_t(blockIdx.y) * kTile, j0 = int64_t(blockIdx.x) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;

  acc_t us_ij[kSub][kSub], bs_ij[kSub][kSub], ut_ij[kSub][kSub], bt_ij[kSub][kSub];
  acc_t r_acc[kSub][kSub] = {}, t_acc[kSub][kSub] = {};
  load_sub_tile(us_ij, Us, B, i0, j0);
  load_sub_tile(bs_ij, Bs, B, i0, j0);
  load_sub_tile(ut_ij, Ut, B, i0, j0);
  load_sub_tile(bt_ij, Bt, B, i0, j0);
  acc_t loss = 0;
  for (int64_t k0 = 0; k0 < B; k0 += KC) {
    __syncthreads();
    stage_cols<acc_t, KC>(gs_ik, Gs, B, i0, k0);  // [k][i] from rows i of G, U
    stage_cols<acc_t, KC>(us_ik, Us, B, i0, k0);
    stage_cols<acc_t, KC>(gt_ik, Gt, B, i0, k0);
    stage_cols<acc_t, KC>(ut_ik, Ut, B, i0, k0);
    stage_rows<acc_t, KC>(gs_jk, Gs, B, k0, j0);  // [k][j] = G_kj = G_jk
    stage_rows<acc_t, KC>(gt_jk, Gt, B, k0, j0);
    __syncthreads();
#pragma unroll 2
    for (int kk = 0; kk < KC; ++kk) {
      acc_t gsj[kSub], gtj[kSub];
#pragma unroll
      for (int b = 0; b < kSub; ++b) {
        gsj[b] = gs_jk[kk][tx + kTileThreads * b];
        gtj[b] = gt_jk[kk][tx + kTileThreads * b];
      }
#pragma unroll
      for (int a = 0; a < kSub; ++a) {
        const int ii = ty + kTileThreads * a;
        const acc_t gsi = gs_ik[kk][ii], usi = us_ik[kk][ii], gti = gt_ik[kk][ii], uti = ut_ik[kk][ii];
#pragma unroll
        for (int b = 0; b < kSub; ++b) {
          const acc_t a_s = rkd_angle(gsj[b], gsi, us_ij[a][b], bs_ij[a][b], usi);
          const acc_t x = a_s - rkd_angle(gtj[b], gti, ut_ij[a][b], bt_ij[a][b], uti);
          const acc_t c = clamp_unit(x);
          loss += smooth_l1_from_grad(x, c);
          r_acc[a][b] += c * usi;
          t_acc[a][b] += c * a_s;
        }
      }
    }
  }
#pragma unroll
  for (int a = 0; a < kSub; ++a) {
#pragma unroll
    for (int b = 0; b < kSub; ++b) {
      const int64_t i = i0 + ty + kTileThreads * a, j = j0 + tx + kTileThreads * b;
      if (i < B && j < B) {
        R[i * B + j] = us_ij[a][b] * r_acc[a][b];
        T[i * B + j] = t_acc[a][b];
      }
    }
  }
  const acc_t total = block_sum(loss, scratch);
  if (tx == 0 && ty == 0) loss_parts[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = total;
}

// P_jk = sum_i c u_ij u_ik over tiles (j-tile <= k-tile) of (j, k); P_kj = P_jk.
template <typename acc_t>
__global__ void __launch_bounds__(kTileBlock)
    rkd_angle_cols_kernel(RkdAngleArgs args, int64_t B, acc_t* __restrict__ P) {
  constexpr int IC = chunk_rows<acc_t>();
  __shared__ acc_t us_ij[IC][kPad], bs_ij[IC][kPad], ut_ij[IC][kPad], bt_ij[IC][kPad];
  __shared__ acc_t gs_ik[IC][kPad], us_ik[IC][kPad], gt_ik[IC][kPad], ut_ik[IC][kPad];
  const acc_t *Gs = static_cast<const acc_t*>(args.gs), *Gt = static_cast<const acc_t*>(args.gt);
  const acc_t *Us = static_cast<const acc_t*>(args.us), *Ut = static_cast<const acc_t*>(args.ut);
  const acc_t *Bs = static_cast<const acc_t*>(args.bs), *Bt = static_cast<const acc_t*>(args.bt);
  // blockIdx.x enumerates the pairs (tj, tk), tj <= tk, row by row.
  const int64_t tiles = (B + kTile - 1) / kTile;
  int64_t tj = 0, rest = blockIdx.x;
  while (rest >= tiles - tj) {
    rest -= tiles - tj;
    ++tj;
  }
  const int64_t j0 = tj * kTile, k0 = (tj + rest) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;

  acc_t gs_jk[kSub][kSub], gt_jk[kSub][kSub], p_acc[kSub][kSub] = {};
  load_sub_tile(gs_jk, Gs, B, j0, k0);
  load_sub_tile(gt_jk, Gt, B, j0, k0);
  for (int64_t i0 = 0; i0 < B; i0 += IC) {
    __syncthreads();
    stage_rows<acc_t, IC>(us_ij, Us, B, i0, j0);  // [i][j]
    stage_rows<acc_t, IC>(bs_ij, Bs, B, i0, j0);
    stage_rows<acc_t, IC>(ut_ij, Ut, B, i0, j0);
    stage_rows<acc_t, IC>(bt_ij, Bt, B, i0, j0);
    stage_rows<acc_t, IC>(gs_ik, Gs, B, i0, k0);  // [i][k]
    stage_rows<acc_t, IC>(us_ik, Us, B, i0, k0);
    stage_rows<acc_t, IC>(gt_ik, Gt, B, i0, k0);
    stage_rows<acc_t, IC>(ut_ik, Ut, B, i0, k0);
    __syncthreads();
#pragma unroll 2
    for (int ii = 0; ii < IC; ++ii) {
      acc_t gsk[kSub], usk[kSub], gtk[kSub], utk[kSub];
#pragma unroll
      for (int b = 0; b < kSub; ++b) {
        const int kk = tx + kTileThreads * b;
        gsk[b] = gs_ik[ii][kk];
        usk[b] = us_ik[ii][kk];
        gtk[b] = gt_ik[ii][kk];
        utk[b] = ut_ik[ii][kk];
      }
#pragma unroll
      for (int a = 0; a < kSub; ++a) {
        const int jj = ty + kTileThreads * a;
        const acc_t usj = us_ij[ii][jj], bsj = bs_ij[ii][jj], utj = ut_ij[ii][jj], btj = bt_ij[ii][jj];
#pragma unroll
        for (int b = 0; b < kSub; ++b) {
          const acc_t x = rkd_angle(gs_jk[a][b], gsk[b], usj, bsj, usk[b]) -
                          rkd_angle(gt_jk[a][b], gtk[b], utj, btj, utk[b]);
          p_acc[a][b] += clamp_unit(x) * usj * usk[b];
        }
      }
    }
  }
#pragma unroll
  for (int a = 0; a < kSub; ++a) {
#pragma unroll
    for (int b = 0; b < kSub; ++b) {
      const int64_t j = j0 + ty + kTileThreads * a, k = k0 + tx + kTileThreads * b;
      if (j < B && k < B) {
        P[j * B + k] = p_acc[a][b];
        if (j0 != k0) P[k * B + j] = p_acc[a][b];
      }
    }
  }
}

struct RkdAssembleArgs {
  const void *d2s, *d2t, *us, *P, *R, *T;
  const void *mu_sums, *k_sum;  // device scalars: sums of the distances [2], sum of the K rows
};

// f_ij = dL/dd2 of the ordered pair (i, j).
template <typename acc_t, bool with_distance, bool with_angle>
__device__ __forceinline__ acc_t rkd_pair_grad_at(const RkdAssembleArgs& a, int64_t idx, acc_t wd, acc_t wa,
                                                  acc_t mu_s, acc_t mu_t, acc_t K, acc_t inv_b2) {
  acc_t f = 0;
  if (with_distance) {
    f += wd * rkd_distance_pair_grad(static_cast<const acc_t*>(a.d2s)[idx], static_cast<const acc_t*>(a.d2t)[idx],
                                     mu_s, mu_t, K, inv_b2);
  }
  if (with_angle) {
    const acc_t u = static_cast<const acc_t*>(a.us)[idx];
    f -= wa * static_cast<const acc_t*>(a.T)[idx] * u * u;
  }
  return f;
}

// Row i of S (relational_math.h).
template <typename acc_t, bool with_distance, bool with_angle>
__global__ void __launch_bounds__(kRowThreads)
    rkd_assemble_kernel(RkdAssembleArgs args, int64_t B, acc_t wd, acc_t wa, acc_t* __restrict__ S) {
  __shared__ acc_t scratch[33];
  const int64_t i = blockIdx.x;
  const acc_t pairs = acc_t(B * (B - 1)), inv_b2 = acc_t(1) / acc_t(B * B);
  const acc_t* mu_sums = static_cast<const acc_t*>(args.mu_sums);
  const acc_t mu_s = mu_sums[0] / pairs, mu_t = mu_sums[1] / pairs;
  const acc_t K = with_distance ? *static_cast<const acc_t*>(args.k_sum) * inv_b2 / pairs : acc_t(0);
  const acc_t *P = static_cast<const acc_t*>(args.P), *R = static_cast<const acc_t*>(args.R);
  acc_t sum_f = 0, sum_r = 0;
  for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
    if (j == i) continue;
    const int64_t ij = i * B + j, ji = j * B + i;
    const acc_t f = rkd_pair_grad_at<acc_t, with_distance, with_angle>(args, ij, wd, wa, mu_s, mu_t, K, inv_b2) +
                    rkd_pair_grad_at<acc_t, with_distance, with_angle>(args, ji, wd, wa, mu_s, mu_t, K, inv_b2);
    acc_t value = -2 * f;
    if (with_angle) {
      value += wa * (P[ij] + P[ji] - 2 * (R[ij] + R[ji]));
      sum_r += R[ij];
    }
    S[ij] = value;
    sum_f += f;
  }
  sum_f = block_sum(sum_f, scratch);
  if (with_angle) sum_r = block_sum(sum_r, scratch);
  if (threadIdx.x == 0) S[i * B + i] = 2 * sum_f + (with_angle ? wa * 2 * (P[i * B + i] + sum_r) : acc_t(0));
}

// ---------------------------------------------------------------- PKT

// The end of a per-row kernel of PKT and similarity: sums the thread's loss and sigma over
// the block and writes row i's four terms (rows is [4, B]: two of the row's own, sigma,
// the loss).
template <typename acc_t>
__device__ __forceinline__ void write_row_terms(acc_t* __restrict__ rows, int64_t B, int64_t i, acc_t first,
                                                acc_t second, acc_t sigma, acc_t loss, acc_t* scratch) {
  loss = block_sum(loss, scratch);
  sigma = block_sum(sigma, scratch);
  if (threadIdx.x == 0) {
    rows[i] = first;
    rows[B + i] = second;
    rows[2 * B + i] = sigma;
    rows[3 * B + i] = loss;
  }
}

// Row i: rows[0][i] = r_s, rows[1][i] = r_t (row sums of K), rows[2][i] = sigma (times B^2),
// rows[3][i] = the loss row.
template <typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    pkt_rows_kernel(const acc_t* __restrict__ Gs, const acc_t* __restrict__ Gt, int64_t B, acc_t eps,
                    acc_t* __restrict__ rows) {
  __shared__ acc_t scratch[33];
  const int64_t i = blockIdx.x;
  const acc_t cs_i = pkt_inv_norm(Gs[i * B + i], eps), ct_i = pkt_inv_norm(Gt[i * B + i], eps);
  acc_t sum_s = 0, sum_t = 0;
  for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
    sum_s += pkt_kernel(Gs[i * B + j], cs_i, pkt_inv_norm(Gs[j * B + j], eps));
    sum_t += pkt_kernel(Gt[i * B + j], ct_i, pkt_inv_norm(Gt[j * B + j], eps));
  }
  const acc_t r_s = block_sum(sum_s, scratch), r_t = block_sum(sum_t, scratch);
  acc_t loss = 0, sigma = 0;
  for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
    const acc_t ps = pkt_kernel(Gs[i * B + j], cs_i, pkt_inv_norm(Gs[j * B + j], eps)) / r_s;
    const acc_t pt = pkt_kernel(Gt[i * B + j], ct_i, pkt_inv_norm(Gt[j * B + j], eps)) / r_t;
    loss += pkt_loss_term(pt, ps, eps);
    sigma -= pt / (ps + eps) * ps;
  }
  write_row_terms(rows, B, i, r_s, r_t, sigma, loss, scratch);
}

// One model's P at (row, col): its kernel value over the row's sum r.
template <typename acc_t>
__device__ __forceinline__ acc_t pkt_probability(const acc_t* G, int64_t B, int64_t row, int64_t col, acc_t r,
                                                 acc_t eps) {
  return pkt_kernel(G[row * B + col], pkt_inv_norm(G[row * B + row], eps), pkt_inv_norm(G[col * B + col], eps)) / r;
}

// kappa = dL/dK at (row, col), from the row's sums (times B^2).
template <typename acc_t>
__device__ __forceinline__ acc_t pkt_kappa(const acc_t* Gs, const acc_t* Gt, const acc_t* rows, int64_t B,
                                           int64_t row, int64_t col, acc_t eps) {
  const acc_t r_s = rows[row], r_t = rows[B + row], sigma = rows[2 * B + row];
  const acc_t ps = pkt_probability(Gs, B, row, col, r_s, eps), pt = pkt_probability(Gt, B, row, col, r_t, eps);
  return (-pt / (ps + eps) - sigma) / r_s;
}

template <typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    pkt_grad_kernel(const acc_t* __restrict__ Gs, const acc_t* __restrict__ Gt,
                    const acc_t* __restrict__ rows, int64_t B, acc_t eps, acc_t* __restrict__ S) {
  __shared__ acc_t scratch[33];
  const int64_t i = blockIdx.x;
  const acc_t inv_b2 = acc_t(1) / acc_t(B * B);
  const acc_t g_ii = Gs[i * B + i], cs_i = pkt_inv_norm(g_ii, eps);
  acc_t lambda = 0, diagonal = 0;
  for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
    const acc_t cs_j = pkt_inv_norm(Gs[j * B + j], eps);
    const acc_t m = acc_t(0.5) * inv_b2 * (pkt_kappa(Gs, Gt, rows, B, i, j, eps) + pkt_kappa(Gs, Gt, rows, B, j, i, eps));
    const acc_t value = m * cs_i * cs_j;
    if (j == i) {
      diagonal = value;  // written once below, with the norm's term
    } else {
      S[i * B + j] = value;
    }
    if (cs_j != acc_t(0)) lambda += m * Gs[i * B + j] * cs_j;
  }
  lambda = block_sum(lambda, scratch);
  diagonal = block_sum(diagonal, scratch);
  if (threadIdx.x == 0) {
    const acc_t norm = sqrt(g_ii);
    if (cs_i != acc_t(0) && norm > acc_t(0)) diagonal -= lambda * cs_i * cs_i / norm;
    S[i * B + i] = diagonal;
  }
}

// ---------------------------------------------------------------- similarity preserving

// Row i: rows[0][i], rows[1][i] = p-norms of the student and teacher rows, rows[2][i] =
// sigma (times B^2 / 2), rows[3][i] = the loss row.
template <typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    similarity_rows_kernel(const acc_t* __restrict__ Gs, const acc_t* __restrict__ Gt, int64_t B,
                           acc_t p, acc_t* __restrict__ rows) {
  __shared__ acc_t scratch[33];
  const int64_t i = blockIdx.x;
  acc_t sum_s = 0, sum_t = 0;
  for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
    sum_s += abs_pow(Gs[i * B + j], p);
    sum_t += abs_pow(Gt[i * B + j], p);
  }
  const acc_t norm_s = p_norm_from_sum(block_sum(sum_s, scratch), p);
  const acc_t norm_t = p_norm_from_sum(block_sum(sum_t, scratch), p);
  const acc_t den_s = normalize_denominator(norm_s), den_t = normalize_denominator(norm_t);
  acc_t loss = 0, sigma = 0;
  for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
    const acc_t hs = Gs[i * B + j] / den_s, diff = hs - Gt[i * B + j] / den_t;
    loss += diff * diff;
    sigma += diff * hs;
  }
  write_row_terms(rows, B, i, norm_s, norm_t, sigma, loss, scratch);
}

template <typename acc_t>
__device__ __forceinline__ acc_t similarity_grad_at(const acc_t* Gs, const acc_t* Gt, const acc_t* rows, int64_t B,
                                                    int64_t row, int64_t col, acc_t p, acc_t two_inv_b2) {
  const acc_t norm_s = rows[row], norm_t = rows[B + row], sigma = rows[2 * B + row] * two_inv_b2;
  const acc_t inv_s = acc_t(1) / normalize_denominator(norm_s);
  const acc_t hs = Gs[row * B + col] * inv_s;
  const acc_t gamma = (hs - Gt[row * B + col] / normalize_denominator(norm_t)) * two_inv_b2;
  return similarity_grad(gamma, hs, sigma, norm_s, inv_s, p);
}

template <typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    similarity_grad_kernel(const acc_t* __restrict__ Gs, const acc_t* __restrict__ Gt,
                           const acc_t* __restrict__ rows, int64_t B, acc_t p, acc_t* __restrict__ S) {
  const int64_t i = blockIdx.x;
  const acc_t two_inv_b2 = acc_t(2) / acc_t(B * B);
  for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
    S[i * B + j] = similarity_grad_at(Gs, Gt, rows, B, i, j, p, two_inv_b2) +
                   similarity_grad_at(Gs, Gt, rows, B, j, i, p, two_inv_b2);
  }
}

// ---------------------------------------------------------------- host side

std::tuple<at::Tensor, at::Tensor> rkd_gram_cuda(const at::Tensor& g_s_in, const at::Tensor& g_t_in,
                                                 double dist_weight, double angle_weight, double tol,
                                                 bool compute_grad) {
  const c10::cuda::CUDAGuard guard(g_s_in.device());
  const GramProblem g = prepare_grams(g_s_in, g_t_in, compute_grad, "rkd_gram");
  const at::Tensor &gs = g.gs, &gt = g.gt, &S = g.S;
  const int64_t B = g.B;
  const auto opts = gs.options();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool with_distance = dist_weight != 0, with_angle = angle_weight != 0;
  at::Tensor loss = at::zeros({}, opts);
  AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "rkd_gram_cuda", [&] {
    using acc_t = scalar_t;
    // d2, u, beta of the student (0..2) and the teacher (3..5); distance sums per row.
    const at::Tensor pair = at::empty({6, B, B}, opts), row_sums = at::empty({2, B}, opts);
    for (int m = 0; m < 2; ++m) {
      rkd_pairs_kernel<acc_t><<<B, kRowThreads, 0, stream>>>(
          cdata<acc_t>(m == 0 ? gs : gt), B, acc_t(tol), mdata<acc_t>(pair[3 * m]), mdata<acc_t>(pair[3 * m + 1]),
          mdata<acc_t>(pair[3 * m + 2]), mdata<acc_t>(row_sums[m]));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const at::Tensor mu_sums = row_sums.sum(1);
    const acc_t inv_b2 = acc_t(1) / acc_t(B * B);
    const acc_t wa = angle_weight / (double(B) * double(B) * double(B));
    at::Tensor k_sum = at::zeros({}, opts);
    if (with_distance) {
      const at::Tensor rows = at::empty({2, B}, opts);
      rkd_distance_rows_kernel<acc_t><<<B, kRowThreads, 0, stream>>>(
          cdata<acc_t>(pair[0]), cdata<acc_t>(pair[3]), B, cdata<acc_t>(mu_sums), mdata<acc_t>(rows[0]),
          mdata<acc_t>(rows[1]));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor sums = rows.sum(1);
      loss.add_(sums[0], dist_weight * double(inv_b2));
      k_sum = sums[1];
    }
    at::Tensor P, R, T;
    if (with_angle) {
      P = at::empty({B, B}, opts);
      R = at::empty({B, B}, opts);
      T = at::empty({B, B}, opts);
      const RkdAngleArgs args{gs.const_data_ptr(), gt.const_data_ptr(), pair[1].const_data_ptr(),
                              pair[4].const_data_ptr(), pair[2].const_data_ptr(), pair[5].const_data_ptr()};
      const int64_t tiles = (B + kTile - 1) / kTile;
      const dim3 threads(kTileThreads, kTileThreads);
      const at::Tensor loss_parts = at::empty({tiles * tiles}, opts);
      rkd_angle_rows_kernel<acc_t><<<dim3(tiles, tiles), threads, 0, stream>>>(
          args, B, mdata<acc_t>(R), mdata<acc_t>(T), mdata<acc_t>(loss_parts));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t tile_pairs = tiles * (tiles + 1) / 2;  // (j-tile, k-tile) with j-tile <= k-tile
      rkd_angle_cols_kernel<acc_t><<<tile_pairs, threads, 0, stream>>>(args, B, mdata<acc_t>(P));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      loss.add_(loss_parts.sum(), double(wa));
    }
    if (!compute_grad) return;
    const RkdAssembleArgs args{pair[0].const_data_ptr(), pair[3].const_data_ptr(), pair[1].const_data_ptr(),
                               with_angle ? P.const_data_ptr() : nullptr, with_angle ? R.const_data_ptr() : nullptr,
                               with_angle ? T.const_data_ptr() : nullptr, mu_sums.const_data_ptr(),
                               k_sum.const_data_ptr()};
    const acc_t wd = dist_weight;
    if (with_distance && with_angle) {
      rkd_assemble_kernel<acc_t, true, true><<<B, kRowThreads, 0, stream>>>(args, B, wd, wa, mdata<acc_t>(S));
    } else if (with_distance) {
      rkd_assemble_kernel<acc_t, true, false><<<B, kRowThreads, 0, stream>>>(args, B, wd, wa, mdata<acc_t>(S));
    } else if (with_angle) {
      rkd_assemble_kernel<acc_t, false, true><<<B, kRowThreads, 0, stream>>>(args, B, wd, wa, mdata<acc_t>(S));
    } else {
      S.zero_();
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, S};
}

// PKT and similarity: a kernel of per-row terms (row 3: the row's loss), then, with
// compute_grad, a kernel writing S from them. Both take one parameter (eps, p).
template <typename acc_t>
using GramRowsKernel = void (*)(const acc_t*, const acc_t*, int64_t, acc_t, acc_t*);
template <typename acc_t>
using GramGradKernel = void (*)(const acc_t*, const acc_t*, const acc_t*, int64_t, acc_t, acc_t*);

struct PktKernels {
  template <typename acc_t>
  static GramRowsKernel<acc_t> rows() { return pkt_rows_kernel<acc_t>; }
  template <typename acc_t>
  static GramGradKernel<acc_t> grad() { return pkt_grad_kernel<acc_t>; }
};

struct SimilarityKernels {
  template <typename acc_t>
  static GramRowsKernel<acc_t> rows() { return similarity_rows_kernel<acc_t>; }
  template <typename acc_t>
  static GramGradKernel<acc_t> grad() { return similarity_grad_kernel<acc_t>; }
};

template <typename Kernels>
std::tuple<at::Tensor, at::Tensor> gram_rows_loss_cuda(const at::Tensor& g_s_in, const at::Tensor& g_t_in,
                                                       double param, bool compute_grad, const char* op) {
  const c10::cuda::CUDAGuard guard(g_s_in.device());
  const GramProblem g = prepare_grams(g_s_in, g_t_in, compute_grad, op);
  const at::Tensor &gs = g.gs, &gt = g.gt, &S = g.S;
  const int64_t B = g.B;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor rows = at::empty({4, B}, gs.options());
  AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "gram_rows_loss_cuda", [&] {
    using acc_t = scalar_t;
    const GramRowsKernel<acc_t> rows_kernel = Kernels::template rows<acc_t>();
    rows_kernel<<<B, kRowThreads, 0, stream>>>(cdata<acc_t>(gs), cdata<acc_t>(gt), B, acc_t(param),
                                               mdata<acc_t>(rows));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!compute_grad) return;
    const GramGradKernel<acc_t> grad_kernel = Kernels::template grad<acc_t>();
    grad_kernel<<<B, kRowThreads, 0, stream>>>(cdata<acc_t>(gs), cdata<acc_t>(gt), cdata<acc_t>(rows), B,
                                               acc_t(param), mdata<acc_t>(S));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {rows[3].sum().div_(double(B) * double(B)), S};
}

std::tuple<at::Tensor, at::Tensor> pkt_gram_cuda(const at::Tensor& g_s, const at::Tensor& g_t, double eps,
                                                 bool compute_grad) {
  return gram_rows_loss_cuda<PktKernels>(g_s, g_t, eps, compute_grad, "pkt_gram");
}

std::tuple<at::Tensor, at::Tensor> similarity_gram_cuda(const at::Tensor& g_s, const at::Tensor& g_t, double p,
                                                        bool compute_grad) {
  return gram_rows_loss_cuda<SimilarityKernels>(g_s, g_t, p, compute_grad, "similarity_gram");
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast_C, CUDA, m) {
  m.impl("rkd_gram", &rkd_gram_cuda);
  m.impl("pkt_gram", &pkt_gram_cuda);
  m.impl("similarity_gram", &similarity_gram_cuda);
}

}  // namespace kdfast
