"""Relational losses from two Gram matrices in Triton (math: csrc/relational_math.h).

Same contract as the ``torch.ops.kdfast_C.*_gram`` kernels: the student's and teacher's
Gram matrices [B, B] (float32 or float64) in, (loss, S = dL/dG_s + dL/dG_sᵀ or empty) out.
B x B stages run one program per row. The RKD angle term (B³) runs as two tiled kernels,
each reducing along one axis of the [i, j, k] cube so that nothing needs atomics:
``_rkd_angle_rows`` (tiles of (i, j), walking k) gives R_ij, T_ij and the loss;
``_rkd_angle_cols`` (tiles of (j, k), walking the apex i) gives P_jk.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import on_inputs_device
from ._args import fp32_halves, join_halves

# Compiled Triton reads module globals only as constexpr.
MIN_SQUARED = tl.constexpr(1e-12)  # pdist's clamp
NORMALIZE_EPS = tl.constexpr(1e-12)  # F.normalize's eps


def _acc(x: torch.Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _row_block(B: int) -> int:
    return min(triton.next_power_of_2(B), 1024)


@triton.jit
def _smooth_l1_grad(x):
    return tl.where(x < -1.0, -1.0, tl.where(x > 1.0, 1.0, x))  # NaN stays NaN


@triton.jit
def _rkd_pairs(G, D2, U, BETA, ROW_SUM, B, tol_hi, tol_lo, BLOCK: tl.constexpr):
    """Row i of the pair values: kept squared distance, u = 1/|x_j - x_i|, beta."""
    i = tl.program_id(0).to(tl.int64)
    g_ii = tl.load(G + i * B + i)
    tol = join_halves(tol_hi, tol_lo, g_ii.dtype)
    total = tl.zeros([BLOCK], g_ii.dtype)
    for j0 in range(0, B, BLOCK):
        j = j0 + tl.arange(0, BLOCK).to(tl.int64)
        valid = j < B
        g_jj = tl.load(G + j * B + j, mask=valid, other=0.0)
        g_ij = tl.load(G + i * B + j, mask=valid, other=0.0)
        d2 = g_ii + g_jj - 2.0 * g_ij
        d2 = tl.where((d2 <= tol * (g_ii + g_jj)) | (j == i), 0.0, d2)  # coincident, diagonal
        norm = tl.sqrt(d2)
        u = tl.where(d2 != 0.0, 1.0 / tl.where(norm < NORMALIZE_EPS, NORMALIZE_EPS, norm), 0.0)
        tl.store(D2 + i * B + j, d2, mask=valid)
        tl.store(U + i * B + j, u, mask=valid)
        tl.store(BETA + i * B + j, u * (g_ii - g_ij), mask=valid)
        dist = tl.sqrt(tl.where(d2 < MIN_SQUARED, MIN_SQUARED, d2))
        total += tl.where(valid & (j != i), dist, 0.0)
    tl.store(ROW_SUM + i, tl.sum(total, 0))


@triton.jit
def _distance(d2):
    return tl.sqrt(tl.where(d2 < MIN_SQUARED, MIN_SQUARED, d2))


@triton.jit
def _rkd_distance_rows(D2S, D2T, MU, LOSS_ROWS, K_ROWS, B, BLOCK: tl.constexpr):
    """Row sums of smooth_l1(rho) and of smooth_l1'(rho) d_s/mu_s (for mu's gradient)."""
    i = tl.program_id(0).to(tl.int64)
    mu_s = tl.load(MU)
    mu_t = tl.load(MU + 1)
    loss = tl.zeros([BLOCK], mu_s.dtype)
    k_sum = tl.zeros([BLOCK], mu_s.dtype)
    for j0 in range(0, B, BLOCK):
        j = j0 + tl.arange(0, BLOCK).to(tl.int64)
        valid = (j < B) & (j != i)
        rho_s = _distance(tl.load(D2S + i * B + j, mask=valid, other=0.0)) / mu_s
        x = rho_s - _distance(tl.load(D2T + i * B + j, mask=valid, other=0.0)) / mu_t
        c = _smooth_l1_grad(x)
        loss += tl.where(valid, c * (x - 0.5 * c), 0.0)
        k_sum += tl.where(valid, c * rho_s, 0.0)
    tl.store(LOSS_ROWS + i, tl.sum(loss, 0))
    tl.store(K_ROWS + i, tl.sum(k_sum, 0))


@triton.jit
def _load_tile(M, rows, cols, rows_ok, cols_ok, B):
    """M[rows][cols] of a B x B matrix, zeros outside it."""
    return tl.load(M + rows[:, None] * B + cols[None, :], mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)


@triton.jit
def _angle_cube(gs_jk, gt_jk, gs_ik, us_ik, gt_ik, ut_ik, us_ij, bs_ij, ut_ij, bt_ij):
    """x = a^s - a^t, c = smooth_l1'(x), a^s and q = c u_ij u_ik over a [I, J, K] block of
    triplets, from tiles of (j, k), (i, k) and (i, j) values (zeros outside the matrix)."""
    a_s = us_ik[:, None, :] * (us_ij[:, :, None] * (gs_jk[None, :, :] - gs_ik[:, None, :]) + bs_ij[:, :, None])
    a_t = ut_ik[:, None, :] * (ut_ij[:, :, None] * (gt_jk[None, :, :] - gt_ik[:, None, :]) + bt_ij[:, :, None])
    x = a_s - a_t
    c = _smooth_l1_grad(x)
    q = c * us_ij[:, :, None] * us_ik[:, None, :]
    return x, c, a_s, q


@triton.jit
def _rkd_angle_rows(GS, GT, US, UT, BS, BT, R, T, LOSS_PARTS, B,
                    BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    """R_ij = sum_k q_ijk, T_ij = sum_k c a^s and the tile's sum of smooth_l1."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    i = pid_i.to(tl.int64) * BI + tl.arange(0, BI)
    j = pid_j.to(tl.int64) * BJ + tl.arange(0, BJ)
    i_ok = i < B
    j_ok = j < B
    us_ij = _load_tile(US, i, j, i_ok, j_ok, B)
    ut_ij = _load_tile(UT, i, j, i_ok, j_ok, B)
    bs_ij = _load_tile(BS, i, j, i_ok, j_ok, B)
    bt_ij = _load_tile(BT, i, j, i_ok, j_ok, B)
    r_acc = tl.zeros([BI, BJ], us_ij.dtype)
    t_acc = tl.zeros([BI, BJ], us_ij.dtype)
    loss = tl.zeros([BI, BJ], us_ij.dtype)
    for k0 in range(0, B, BK):
        k = k0 + tl.arange(0, BK).to(tl.int64)
        k_ok = k < B
        x, c, a_s, q = _angle_cube(_load_tile(GS, j, k, j_ok, k_ok, B), _load_tile(GT, j, k, j_ok, k_ok, B),
                                   _load_tile(GS, i, k, i_ok, k_ok, B), _load_tile(US, i, k, i_ok, k_ok, B),
                                   _load_tile(GT, i, k, i_ok, k_ok, B), _load_tile(UT, i, k, i_ok, k_ok, B),
                                   us_ij, bs_ij, ut_ij, bt_ij)
        r_acc += tl.sum(q, 2)
        t_acc += tl.sum(c * a_s, 2)
        loss += tl.sum(c * (x - 0.5 * c), 2)
    out = i[:, None] * B + j[None, :]
    ok = i_ok[:, None] & j_ok[None, :]
    tl.store(R + out, r_acc, mask=ok)
    tl.store(T + out, t_acc, mask=ok)
    tl.store(LOSS_PARTS + pid_i * tl.num_programs(1) + pid_j, tl.sum(tl.sum(loss, 1), 0))


@triton.jit
def _rkd_angle_cols(GS, GT, US, UT, BS, BT, P, B, BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    """P_jk = sum_i q_ijk."""
    j = tl.program_id(0).to(tl.int64) * BJ + tl.arange(0, BJ)
    k = tl.program_id(1).to(tl.int64) * BK + tl.arange(0, BK)
    j_ok = j < B
    k_ok = k < B
    gs_jk = _load_tile(GS, j, k, j_ok, k_ok, B)
    gt_jk = _load_tile(GT, j, k, j_ok, k_ok, B)
    p_acc = tl.zeros([BJ, BK], gs_jk.dtype)
    for i0 in range(0, B, BI):
        i = i0 + tl.arange(0, BI).to(tl.int64)
        i_ok = i < B
        x, c, a_s, q = _angle_cube(gs_jk, gt_jk,
                                   _load_tile(GS, i, k, i_ok, k_ok, B), _load_tile(US, i, k, i_ok, k_ok, B),
                                   _load_tile(GT, i, k, i_ok, k_ok, B), _load_tile(UT, i, k, i_ok, k_ok, B),
                                   _load_tile(US, i, j, i_ok, j_ok, B), _load_tile(BS, i, j, i_ok, j_ok, B),
                                   _load_tile(UT, i, j, i_ok, j_ok, B), _load_tile(BT, i, j, i_ok, j_ok, B))
        p_acc += tl.sum(q, 0)
    tl.store(P + j[:, None] * B + k[None, :], p_acc, mask=j_ok[:, None] & k_ok[None, :])


@triton.jit
def _rkd_pair_grad(D2S, D2T, US, T, PARAMS, idx, valid, BLOCK: tl.constexpr,
                   WITH_DISTANCE: tl.constexpr, WITH_ANGLE: tl.constexpr):
    """f = dL/dd2 of the ordered pairs at flat indices idx."""
    f = tl.zeros([BLOCK], tl.load(PARAMS).dtype)
    if WITH_DISTANCE:
        wd = tl.load(PARAMS)
        mu_s = tl.load(PARAMS + 2)
        mu_t = tl.load(PARAMS + 3)
        K = tl.load(PARAMS + 4)
        inv_b2 = tl.load(PARAMS + 5)
        d2s = tl.load(D2S + idx, mask=valid, other=1.0)
        ds = _distance(d2s)
        w = _smooth_l1_grad(ds / mu_s - _distance(tl.load(D2T + idx, mask=valid, other=1.0)) / mu_t) * inv_b2
        f += wd * (w - K) / mu_s * tl.where(d2s < MIN_SQUARED, 0.0, 0.5 / ds)
    if WITH_ANGLE:
        wa = tl.load(PARAMS + 1)
        us = tl.load(US + idx, mask=valid, other=0.0)
        f -= wa * tl.load(T + idx, mask=valid, other=0.0) * us * us
    return f


@triton.jit
def _rkd_assemble(D2S, D2T, US, P, R, T, PARAMS, S, B, BLOCK: tl.constexpr,
                  WITH_DISTANCE: tl.constexpr, WITH_ANGLE: tl.constexpr):
    """Row i of S (csrc/relational_math.h)."""
    i = tl.program_id(0).to(tl.int64)
    wa = tl.load(PARAMS + 1)
    sum_f = tl.zeros([BLOCK], wa.dtype)
    sum_r = tl.zeros([BLOCK], wa.dtype)
    for j0 in range(0, B, BLOCK):
        j = j0 + tl.arange(0, BLOCK).to(tl.int64)
        valid = (j < B) & (j != i)
        ij = i * B + j
        ji = j * B + i
        f = (_rkd_pair_grad(D2S, D2T, US, T, PARAMS, ij, valid, BLOCK, WITH_DISTANCE, WITH_ANGLE)
             + _rkd_pair_grad(D2S, D2T, US, T, PARAMS, ji, valid, BLOCK, WITH_DISTANCE, WITH_ANGLE))
        value = -2.0 * f
        if WITH_ANGLE:
            r_ij = tl.load(R + ij, mask=valid, other=0.0)
            value += wa * (tl.load(P + ij, mask=valid, other=0.0) + tl.load(P + ji, mask=valid, other=0.0)
                           - 2.0 * (r_ij + tl.load(R + ji, mask=valid, other=0.0)))
            sum_r += r_ij
        tl.store(S + ij, value, mask=valid)
        sum_f += tl.where(valid, f, 0.0)
    diagonal = 2.0 * tl.sum(sum_f, 0)
    if WITH_ANGLE:
        diagonal += wa * 2.0 * (tl.load(P + i * B + i) + tl.sum(sum_r, 0))
    tl.store(S + i * B + i, diagonal)


@on_inputs_device
def rkd_gram(g_s, g_t, dist_weight, angle_weight, tol, compute_grad):
    """RKD from the Grams of the centred embeddings: (loss, S or empty)."""
    B = g_s.shape[0]
    g_s, g_t = g_s.contiguous(), g_t.contiguous()
    block = _row_block(B)
    sides = []
    for g in (g_s, g_t):
        d2, u, beta = (torch.empty_like(g) for _ in range(3))
        row_sum = g.new_empty(B)
        _rkd_pairs[(B,)](g, d2, u, beta, row_sum, B, *fp32_halves(tol), BLOCK=block)
        sides.append((d2, u, beta, row_sum.sum() / (B * (B - 1))))
    (d2s, us, bs, mu_s), (d2t, ut, bt, mu_t) = sides
    with_distance, with_angle = dist_weight != 0, angle_weight != 0
    loss = g_s.new_zeros(())
    K = g_s.new_zeros(())
    if with_distance:
        mu = torch.stack([mu_s, mu_t])
        loss_rows, k_rows = g_s.new_empty(B), g_s.new_empty(B)
        _rkd_distance_rows[(B,)](d2s, d2t, mu, loss_rows, k_rows, B, BLOCK=block)
        loss = loss + dist_weight * loss_rows.sum() / (B * B)
        K = k_rows.sum() / (B * B) / (B * (B - 1))
    wa = angle_weight / float(B) ** 3
    P = R = T = g_s
    if with_angle:
        P, R, T = (torch.empty_like(g_s) for _ in range(3))
        bi, bj, bk = 16, 16, 8
        grid = (triton.cdiv(B, bi), triton.cdiv(B, bj))
        loss_parts = g_s.new_empty(grid[0] * grid[1])
        _rkd_angle_rows[grid](g_s, g_t, us, ut, bs, bt, R, T, loss_parts, B, BI=bi, BJ=bj, BK=bk)
        _rkd_angle_cols[(triton.cdiv(B, bj), triton.cdiv(B, bk))](g_s, g_t, us, ut, bs, bt, P, B,
                                                                BI=bi, BJ=bj, BK=bk)
        loss = loss + wa * loss_parts.sum()
    if not compute_grad:
        return loss, g_s.new_empty(0)
    params = torch.stack([g_s.new_tensor(float(dist_weight)), g_s.new_tensor(wa), mu_s, mu_t, K,
                          g_s.new_tensor(1.0 / (B * B))])
    S = torch.empty_like(g_s)
    _rkd_assemble[(B,)](d2s, d2t, us, P, R, T, params, S, B, BLOCK=block,
                        WITH_DISTANCE=with_distance, WITH_ANGLE=with_angle)
    return loss, S


@triton.jit
def _pkt_inv_norm(g_ii, eps):
    n = tl.sqrt(g_ii)
    return tl.where(n - n == 0.0, 1.0 / (n + eps), 0.0)  # 0 for a NaN or infinite norm


@triton.jit
def _pkt_kernel(g_ij, c_i, c_j):
    cosine = tl.where(c_i == 0.0, 0.0, tl.where(c_j == 0.0, 0.0, g_ij * c_i * c_j))
    return (cosine + 1.0) * 0.5


@triton.jit
def _pkt_rows(GS, GT, PS, PT, ROWS, B, eps_hi, eps_lo, BLOCK: tl.constexpr):
    """Row i: the probabilities P_s, P_t (computed once here, kept for the gradient), r_s
    (the row sum of K_s), sigma_i (times B²) and the loss row."""
    i = tl.program_id(0).to(tl.int64)
    g_ii = tl.load(GS + i * B + i)
    eps = join_halves(eps_hi, eps_lo, g_ii.dtype)
    cs_i = _pkt_inv_norm(g_ii, eps)
    ct_i = _pkt_inv_norm(tl.load(GT + i * B + i), eps)
    sum_s = tl.zeros([BLOCK], g_ii.dtype)
    sum_t = tl.zeros([BLOCK], g_ii.dtype)
    for j0 in range(0, B, BLOCK):  # K, stored unnormalised, and its row sums
        j = j0 + tl.arange(0, BLOCK).to(tl.int64)
        valid = j < B
        cs_j = _pkt_inv_norm(tl.load(GS + j * B + j, mask=valid, other=1.0), eps)
        ct_j = _pkt_inv_norm(tl.load(GT + j * B + j, mask=valid, other=1.0), eps)
        k_s = tl.where(valid, _pkt_kernel(tl.load(GS + i * B + j, mask=valid, other=0.0), cs_i, cs_j), 0.0)
        k_t = tl.where(valid, _pkt_kernel(tl.load(GT + i * B + j, mask=valid, other=0.0), ct_i, ct_j), 0.0)
        tl.store(PS + i * B + j, k_s, mask=valid)
        tl.store(PT + i * B + j, k_t, mask=valid)
        sum_s += k_s
        sum_t += k_t
    r_s = tl.sum(sum_s, 0)
    r_t = tl.sum(sum_t, 0)
    tl.debug_barrier()  # the row of K written above is read back below
    loss = tl.zeros([BLOCK], g_ii.dtype)
    sigma = tl.zeros([BLOCK], g_ii.dtype)
    for j0 in range(0, B, BLOCK):  # P = K / r, the loss and sigma
        j = j0 + tl.arange(0, BLOCK).to(tl.int64)
        valid = j < B
        ps = tl.load(PS + i * B + j, mask=valid, other=0.0) / r_s
        pt = tl.load(PT + i * B + j, mask=valid, other=0.0) / r_t
        tl.store(PS + i * B + j, ps, mask=valid)
        tl.store(PT + i * B + j, pt, mask=valid)
        loss += tl.where(valid, pt * tl.log((pt + eps) / (ps + eps)), 0.0)
        sigma -= tl.where(valid, pt / (ps + eps) * ps, 0.0)
    tl.store(ROWS + i, r_s)
    tl.store(ROWS + B + i, tl.sum(sigma, 0))
    tl.store(ROWS + 2 * B + i, tl.sum(loss, 0))


@triton.jit
def _pkt_kappa(PS, PT, ROWS, row, col, valid, B, eps):
    """kappa = dL/dK at (row, col) (times B²) from the stored probabilities and the row's
    sums (one of row, col is a scalar, the other a block)."""
    idx = row * B + col
    row = idx // B
    r_s = tl.load(ROWS + row, mask=valid, other=1.0)
    sigma = tl.load(ROWS + B + row, mask=valid, other=0.0)
    ps = tl.load(PS + idx, mask=valid, other=0.0)
    pt = tl.load(PT + idx, mask=valid, other=0.0)
    return (-pt / (ps + eps) - sigma) / r_s


@triton.jit
def _pkt_grad(GS, PS, PT, ROWS, S, B, eps_hi, eps_lo, BLOCK: tl.constexpr):
    """Row i of S = m_ij c_i c_j, plus the norm's term on the diagonal."""
    i = tl.program_id(0).to(tl.int64)
    g_ii = tl.load(GS + i * B + i)
    eps = join_halves(eps_hi, eps_lo, g_ii.dtype)
    inv_b2 = 1.0 / (tl.cast(B, g_ii.dtype) * tl.cast(B, g_ii.dtype))
    cs_i = _pkt_inv_norm(g_ii, eps)
    lam = tl.zeros([BLOCK], g_ii.dtype)
    diagonal = tl.zeros([BLOCK], g_ii.dtype)
    for j0 in range(0, B, BLOCK):
        j = j0 + tl.arange(0, BLOCK).to(tl.int64)
        valid = j < B
        cs_j = _pkt_inv_norm(tl.load(GS + j * B + j, mask=valid, other=1.0), eps)
        m = 0.5 * inv_b2 * (_pkt_kappa(PS, PT, ROWS, i, j, valid, B, eps)
                            + _pkt_kappa(PS, PT, ROWS, j, i, valid, B, eps))
        value = m * cs_i * cs_j
        tl.store(S + i * B + j, value, mask=valid & (j != i))
        diagonal += tl.where(j == i, value, 0.0)
        g_ij = tl.load(GS + i * B + j, mask=valid, other=0.0)
        lam += tl.where(valid & (cs_j != 0.0), m * g_ij * cs_j, 0.0)
    norm = tl.sqrt(g_ii)
    # (a row with a non-finite norm has cs_i = 0 and no such term)
    norm_term = tl.where(cs_i == 0.0, 0.0, tl.where(norm > 0.0, tl.sum(lam, 0) * cs_i * cs_i / norm, 0.0))
    tl.store(S + i * B + i, tl.sum(diagonal, 0) - norm_term)


@on_inputs_device
def pkt_gram(g_s, g_t, eps, compute_grad):
    """PKT from the Grams of the embeddings: (loss, S or empty)."""
    B = g_s.shape[0]
    g_s, g_t = g_s.contiguous(), g_t.contiguous()
    block = _row_block(B)
    p_s, p_t = torch.empty_like(g_s), torch.empty_like(g_s)
    rows = g_s.new_empty(3, B)  # r_s, sigma (times B²), loss rows
    _pkt_rows[(B,)](g_s, g_t, p_s, p_t, rows, B, *fp32_halves(eps), BLOCK=block)
    loss = rows[2].sum() / (B * B)
    if not compute_grad:
        return loss, g_s.new_empty(0)
    S = torch.empty_like(g_s)
    _pkt_grad[(B,)](g_s, p_s, p_t, rows, S, B, *fp32_halves(eps), BLOCK=block)
    return loss, S


@triton.jit
def _abs_pow(x, p, P_MODE: tl.constexpr):
    a = tl.abs(x)
    if P_MODE == 2:
        out = a * a
    elif P_MODE == 1:
        out = a
    else:
        out = tl.where(a == 0.0, 0.0, tl.exp(p * tl.log(a)))
    return out


@triton.jit
def _signed_pow_grad(x, p, P_MODE: tl.constexpr):
    """sign(x) |x|^(p-1)."""
    sign = tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))
    if P_MODE == 2:
        out = x
    elif P_MODE == 1:
        out = sign
    else:
        out = sign * tl.where(x == 0.0, 0.0, tl.exp((p - 1.0) * tl.log(tl.abs(x))))
    return out


@triton.jit
def _similarity_rows(GS, GT, ROWS, B, p_hi, p_lo, BLOCK: tl.constexpr, P_MODE: tl.constexpr):
    """Row i: the p-norms of the student and teacher rows, sigma_i (times B²/2), loss row."""
    i = tl.program_id(0).to(tl.int64)
    first = tl.load(GS + i * B)
    p = join_halves(p_hi, p_lo, first.dtype)
    sum_s = tl.zeros([BLOCK], first.dtype)
    sum_t = tl.zeros([BLOCK], first.dtype)
    for j0 in range(0, B, BLOCK):
        j = j0 + tl.arange(0, BLOCK).to(tl.int64)
        valid = j < B
        sum_s += _abs_pow(tl.load(GS + i * B + j, mask=valid, other=0.0), p, P_MODE)
        sum_t += _abs_pow(tl.load(GT + i * B + j, mask=valid, other=0.0), p, P_MODE)
    total_s = tl.sum(sum_s, 0)
    total_t = tl.sum(sum_t, 0)
    if P_MODE == 2:
        norm_s = tl.sqrt(total_s)
        norm_t = tl.sqrt(total_t)
    elif P_MODE == 1:
        norm_s = total_s
        norm_t = total_t
    else:
        norm_s = tl.exp(tl.log(total_s) / p)
        norm_t = tl.exp(tl.log(total_t) / p)
    den_s = tl.where(norm_s < NORMALIZE_EPS, NORMALIZE_EPS, norm_s)
    den_t = tl.where(norm_t < NORMALIZE_EPS, NORMALIZE_EPS, norm_t)
    loss = tl.zeros([BLOCK], first.dtype)
    sigma = tl.zeros([BLOCK], first.dtype)
    for j0 in range(0, B, BLOCK):
        j = j0 + tl.arange(0, BLOCK).to(tl.int64)
        valid = j < B
        hs = tl.load(GS + i * B + j, mask=valid, other=0.0) / den_s
        diff = hs - tl.load(GT + i * B + j, mask=valid, other=0.0) / den_t
        loss += diff * diff
        sigma += diff * hs
    tl.store(ROWS + i, norm_s)
    tl.store(ROWS + B + i, norm_t)
    tl.store(ROWS + 2 * B + i, tl.sum(sigma, 0))
    tl.store(ROWS + 3 * B + i, tl.sum(loss, 0))


@triton.jit
def _similarity_pair_grad(GS, GT, ROWS, row, col, valid, B, p, two_inv_b2, P_MODE: tl.constexpr):
    """dL/dG at (row, col) from the row's norms and sigma (one of row, col is a scalar)."""
    idx = row * B + col
    row = idx // B
    norm_s = tl.load(ROWS + row, mask=valid, other=1.0)
    norm_t = tl.load(ROWS + B + row, mask=valid, other=1.0)
    sigma = tl.load(ROWS + 2 * B + row, mask=valid, other=0.0) * two_inv_b2
    den_s = tl.where(norm_s < NORMALIZE_EPS, NORMALIZE_EPS, norm_s)
    den_t = tl.where(norm_t < NORMALIZE_EPS, NORMALIZE_EPS, norm_t)
    hs = tl.load(GS + idx, mask=valid, other=0.0) / den_s
    gamma = (hs - tl.load(GT + idx, mask=valid, other=0.0) / den_t) * two_inv_b2
    clamped = norm_s < NORMALIZE_EPS
    return tl.where(clamped, gamma / NORMALIZE_EPS, (gamma - sigma * _signed_pow_grad(hs, p, P_MODE)) / den_s)


@triton.jit
def _similarity_grad(GS, GT, ROWS, S, B, p_hi, p_lo, BLOCK: tl.constexpr, P_MODE: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    acc = tl.load(ROWS).dtype
    p = join_halves(p_hi, p_lo, acc)
    two_inv_b2 = 2.0 / (tl.cast(B, acc) * tl.cast(B, acc))
    for j0 in range(0, B, BLOCK):
        j = j0 + tl.arange(0, BLOCK).to(tl.int64)
        valid = j < B
        value = (_similarity_pair_grad(GS, GT, ROWS, i, j, valid, B, p, two_inv_b2, P_MODE)
                 + _similarity_pair_grad(GS, GT, ROWS, j, i, valid, B, p, two_inv_b2, P_MODE))
        tl.store(S + i * B + j, value, mask=valid)


@on_inputs_device
def similarity_gram(g_s, g_t, p, compute_grad):
    """Similarity preserving from the Grams of the features: (loss, S or empty)."""
    B = g_s.shape[0]
    g_s, g_t = g_s.contiguous(), g_t.contiguous()
    block = _row_block(B)
    p_mode = 2 if p == 2 else (1 if p == 1 else 0)
    rows = g_s.new_empty(4, B)  # norms of student and teacher rows, sigma (times B²/2), loss rows
    _similarity_rows[(B,)](g_s, g_t, rows, B, *fp32_halves(p), BLOCK=block, P_MODE=p_mode)
    loss = rows[3].sum() / (B * B)
    if not compute_grad:
        return loss, g_s.new_empty(0)
    S = torch.empty_like(g_s)
    _similarity_grad[(B,)](g_s, g_t, rows, S, B, *fp32_halves(p), BLOCK=block, P_MODE=p_mode)
    return loss, S
