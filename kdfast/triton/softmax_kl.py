"""Fused temperature-softmax divergences in Triton (math: csrc/softmax_kl_math.h).

One kernel for every divergence of a dense teacher: a program takes BLOCK_R rows and walks
their classes in tiles of BLOCK_V: pass 1 keeps an online max and sum of exponentials per
row and side, with the divergence's cross sum (forward KL: the teacher-weighted logit gap;
reverse KL: the student-weighted gap to the anchor); the row's loss and gradient constants
follow (JSD and TVD after one more pass for the loss and W); the last pass writes the
gradient, e.g. ``grad_j = a·exp((s_j - M_s)/T) - b·exp((t_j - M_t)/T)`` for forward KL. Rows with contiguous classes run
one row per program with wide tiles; rows that are contiguous with each other (the class
dim strided, e.g. [B, C, H, W] with dim=1) run 64 rows per program, coalesced across rows.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._dtypes import acc_dtype
from . import on_inputs_device
from ._args import fp32_halves, join_halves


@triton.jit
def _softplus(x):
    # log(1 + exp(x)) without overflow
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _overflows(x, inv_T):
    """x/T overflows for a finite x (the definition's softmax of x/T is then NaN;
    softmax_kl_overflows in csrc/softmax_kl_math.h)."""
    big = x * inv_T
    return (big - big != 0.0) & (x - x == 0.0)


@triton.jit
def _xlogy(x, log_y):
    return tl.where(x == 0.0, 0.0, x * log_y)


def _as_avi(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x as [A, V, I] around its class dim (a view when the strides allow)."""
    A = math.prod(x.shape[:dim])
    I = math.prod(x.shape[dim + 1:])
    return x.reshape(A, x.shape[dim], I)


def _tiles(s3: torch.Tensor, element_size: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_V, num_warps) for logits seen as [A, V, I]."""
    A, V, I = s3.shape
    # Neighbouring rows contiguous with each other and classes strided: many rows a program.
    if (s3.stride(2) if I > 1 else s3.stride(0)) == 1 and s3.stride(1) != 1:
        return 64, 16, 4
    # tile widths in a few steps only: each is a compiled variant
    block_v = min(max(triton.next_power_of_2(V), 512), 4096 if element_size >= 4 else 8192)
    return 1, block_v, 16 if block_v >= 4096 else 4


def kernel_path(s: torch.Tensor, dim: int) -> str:
    """The kernel variant softmax_kl_triton runs for these logits: "columns" (many rows a
    program) or "rows-<BLOCK_V>"."""
    block_r, block_v, _ = _tiles(_as_avi(s, dim), s.element_size())
    return "columns" if block_r > 1 else f"rows-{block_v}"


# The divergences' math, its derivation and the pass structure are in csrc/softmax_kl_math.h
# ("The LLM divergences"); the helpers below mirror its functions of the same names.
# DIVERGENCE: 0 forward KL, 1 reverse KL, 2 JSD, 3 TVD (the C++ enum Divergence).

DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3}


@triton.jit
def _divergence_terms(d, ps, pt, beta, DIVERGENCE: tl.constexpr):
    """divergence_terms: per class (loss term, q·h, h) from d = log p - log q (teacher minus
    student, computed by the caller from the centred logits) and the probabilities ps, pt."""
    if DIVERGENCE == 0:
        loss = tl.where(pt > 0.0, pt * d, 0.0)
        qh = -pt
        h = -tl.exp(d)
    elif DIVERGENCE == 1:
        h = -d
        loss = tl.where(ps > 0.0, ps * h, 0.0)
        qh = loss
    elif DIVERGENCE == 2:
        e = tl.exp(-tl.abs(d))  # log m without forming m (one exp, one log)
        up = d > 0.0
        g = -tl.log(tl.where(up, beta + (1.0 - beta) * e, (1.0 - beta) + beta * e))
        gt = tl.where(up, g, g + d)  # log p - log m
        gs = tl.where(up, g - d, g)  # log q - log m
        h = (1.0 - beta) * gs
        qh = tl.where(ps > 0.0, ps * h, 0.0)
        loss = beta * tl.where(pt > 0.0, pt * gt, 0.0) + qh
    else:
        gap = ps - pt
        loss = 0.5 * tl.abs(gap)
        h = tl.where(gap > 0.0, 0.5, tl.where(gap < 0.0, -0.5, 0.0))
        qh = ps * h
    return loss, qh, h


@triton.jit
def _divergence_weight(qh, h, ps, h_a, DIVERGENCE: tl.constexpr):
    """divergence_weight: w = q (h - h_a), a class's share of the gradient anchored on the
    student's most probable class a."""
    if DIVERGENCE == 0:
        return qh - ps * h_a
    return tl.where(ps > 0.0, ps * (h - h_a), 0.0)


# The row count is not specialised (fewer compiled variants). Sizes and strides are: a
# stride of 1 makes loads contiguous, I == 1 drops the inner index, and V and the row
# strides divisible by 16 let rows load in 16-byte vectors.
@triton.jit(do_not_specialize=["n_rows", "ignore_index"])
def _softmax_kl_kernel(
    s_ptr, t_ptr, grad_ptr, target_ptr, loss_ptr, scale_ptr,
    n_rows, V, I,
    s_sa, s_sv, s_si, t_sa, t_sv, t_si, g_sa, g_sv, g_si,
    T_hi, T_lo, alpha_hi, alpha_lo, beta_hi, beta_lo, jsd_beta_hi, jsd_beta_lo, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_TARGET: tl.constexpr, DECOUPLED: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """BLOCK_R rows a program: forward KL and DecoupledKD, reverse KL (2 passes), JSD and
    TVD (3 passes)."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    a_idx = rows // I
    i_idx = rows % I
    s_row = a_idx * s_sa + i_idx * s_si
    t_row = a_idx * t_sa + i_idx * t_si
    T = join_halves(T_hi, T_lo, ACC)  # float args are fp32 on a GPU: two halves keep fp64
    beta = join_halves(jsd_beta_hi, jsd_beta_lo, ACC)
    inv_T = 1.0 / T
    neg_inf = float("-inf")
    if HAS_TARGET:
        label = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index)
        ignored = label == ignore_index
    else:
        label = tl.zeros([BLOCK_R], dtype=tl.int64)
        ignored = rows < 0
    # DecoupledKD's target class, excluded from the sums; a label outside [0, V) gets a NaN
    # loss (and is not read out of bounds).
    bad_label = DECOUPLED & ~ignored & ((label < 0) | (label >= V))
    g = tl.where(ignored | bad_label, -1, label)

    # Pass 1: online maxima and sums of exp(y), y = (x - M)/T centred on the running maxima
    # (a max still -inf, nothing seen, centres on 0: exp(-inf - 0) = 0).
    # Forward KL: cross = sum e^yt (yt - ys) (softmax_kl_recentre when a maximum moves).
    # The others: t_a, the teacher's logit at the student's running argmax a (the anchor);
    # reverse KL also cross = sum e^ys d, d_j = ((s_j - s_a) - (t_j - t_a))/T
    # (reverse_kl_finish_row), re-centred when a moves: d shifts by
    # -((s_a' - s_a) - (t_a' - t_a))/T and e^ys by f_s.
    m_s = tl.full([BLOCK_R], neg_inf, ACC)
    m_t = tl.full([BLOCK_R], neg_inf, ACC)
    t_a = tl.zeros([BLOCK_R], ACC)
    z_s = tl.zeros([BLOCK_R], ACC)
    z_t = tl.zeros([BLOCK_R], ACC)
    cross = tl.zeros([BLOCK_R], ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)  # cols * stride may pass 2^31
        mask = row_ok[:, None] & (cols < V)[None, :]
        xs = tl.load(s_ptr + s_row[:, None] + cols[None, :] * s_sv, mask=mask, other=neg_inf).to(ACC)
        xt = tl.load(t_ptr + t_row[:, None] + cols[None, :] * t_sv, mask=mask, other=neg_inf).to(ACC)
        if DECOUPLED:
            excluded = cols[None, :] == g[:, None]
            xs = tl.where(excluded, neg_inf, xs)
            xt = tl.where(excluded, neg_inf, xt)
        tile_s = tl.max(xs, axis=1)
        new_s = tl.maximum(m_s, tile_s)
        new_t = tl.maximum(m_t, tl.max(xt, axis=1))
        ref_s = tl.where(new_s == neg_inf, 0.0, new_s)
        ref_t = tl.where(new_t == neg_inf, 0.0, new_t)
        f_s = tl.exp((m_s - ref_s) * inv_T)  # 0 when nothing was seen (m = -inf)
        f_t = tl.exp((m_t - ref_t) * inv_T)
        e_s = tl.exp((xs - ref_s[:, None]) * inv_T)
        e_t = tl.exp((xt - ref_t[:, None]) * inv_T)
        old_s = tl.where(m_s == neg_inf, 0.0, m_s)
        if DIVERGENCE == 0:
            old_t = tl.where(m_t == neg_inf, 0.0, m_t)
            shift = ((ref_t - old_t) - (ref_s - old_s)) * inv_T
            cross = tl.where(z_t == 0.0, cross, cross - z_t * shift) * f_t
            gap = tl.where(e_t > 0.0, e_t * (((xt - ref_t[:, None]) - (xs - ref_s[:, None])) * inv_T), 0.0)
            cross += tl.sum(gap, axis=1)
        else:
            at_max = (xs == tile_s[:, None]) & mask
            first = tl.min(tl.where(at_max, cols[None, :], V), axis=1)
            new_t_a = tl.where(tile_s > m_s, tl.sum(tl.where(cols[None, :] == first[:, None], xt, 0.0), axis=1), t_a)
            if DIVERGENCE == 1:
                shift = ((ref_s - old_s) - (new_t_a - t_a)) * inv_T
                d = ((xs - ref_s[:, None]) - (xt - new_t_a[:, None])) * inv_T
                cross = tl.where(z_s > 0.0, f_s * (cross - z_s * shift), 0.0)  # reverse_kl_recentre
                cross += tl.sum(tl.where(e_s > 0.0, e_s * d, 0.0), axis=1)
            t_a = new_t_a
        z_s = z_s * f_s + tl.sum(e_s, axis=1)
        z_t = z_t * f_t + tl.sum(e_t, axis=1)
        m_s = new_s
        m_t = new_t

    scale = tl.load(scale_ptr).to(ACC)
    log_z_s = tl.log(z_s)
    log_z_t = tl.log(z_t)
    # x/T overflowing for a finite logit: no softmax, NaN (softmax_kl_overflows)
    overflow = _overflows(m_s, inv_T) | _overflows(m_t, inv_T)
    h_a = tl.zeros([BLOCK_R], ACC)
    grad_g = tl.zeros([BLOCK_R], ACC)
    if DIVERGENCE == 0:  # softmax_kl_finish_row: grad = coef_a e^ys - coef_b e^yt
        kl = cross / z_t + log_z_s - log_z_t
        gs = T * scale
        if DECOUPLED:
            alpha = join_halves(alpha_hi, alpha_lo, ACC)
            dkd_beta = join_halves(beta_hi, beta_lo, ACC)
            g_safe = tl.maximum(g, 0)
            s_g = tl.load(s_ptr + s_row + g_safe * s_sv, mask=row_ok, other=0.0).to(ACC)
            t_g = tl.load(t_ptr + t_row + g_safe * t_sv, mask=row_ok, other=0.0).to(ACC)
            overflow = overflow | _overflows(s_g, inv_T) | _overflows(t_g, inv_T)
            u_s = (s_g - m_s) * inv_T - log_z_s  # log(p_g / p_ng)
            u_t = (t_g - m_t) * inv_T - log_z_t
            log_p_g = -_softplus(-u_s)
            log_p_ng = -_softplus(u_s)
            log_q_g = -_softplus(-u_t)
            log_q_ng = -_softplus(u_t)
            p_g = tl.exp(log_p_g)
            p_ng = tl.exp(log_p_ng)
            q_g = tl.exp(log_q_g)
            q_ng = tl.exp(log_q_ng)
            eps = 1e-7
            log_eps = math.log(1e-7)
            tckd = (_xlogy(q_g, log_q_g) - q_g * tl.where(p_g >= eps, log_p_g, log_eps)
                    + _xlogy(q_ng, log_q_ng) - q_ng * tl.where(p_ng >= eps, log_p_ng, log_eps))
            D = tl.where(p_g >= eps, -q_g * p_ng, 0.0) + tl.where(p_ng >= eps, q_ng * p_g, 0.0)
            loss = T * T * (alpha * tckd + dkd_beta * kl)
            coef_a = gs * (dkd_beta - alpha * D) / z_s
            coef_b = gs * dkd_beta / z_t
            grad_g = gs * alpha * D
        else:
            loss = T * T * kl
            coef_a = gs / z_s
            coef_b = gs / z_t
        loss = tl.where(bad_label, float("nan"), loss)
    elif DIVERGENCE == 1:  # reverse_kl_finish_row: grad = coef_a e^ys (d - coef_b)
        rkl = cross / z_s + (m_t - t_a) * inv_T + (log_z_t - log_z_s)
        # the teacher rules out a class with student mass (reverse_kl_finish_row)
        ruled_out = (t_a == neg_inf) | ((cross != cross) & (z_s == z_s) & (z_t == z_t))
        rkl = tl.where(ruled_out, float("inf"), rkl)
        loss = T * T * rkl
        coef_a = T * scale / z_s
        coef_b = cross / z_s
    else:  # JSD, TVD: grad = coef_a (w - q coef_b)
        # h at the anchor: log q_a = -log Z_s (ys_a = 0), log p_a = (t_a - M_t)/T - log Z_t.
        ls_a = -log_z_s
        lt_a = (t_a - m_t) * inv_T - log_z_t
        loss_a, qh_a, h_a = _divergence_terms(lt_a - ls_a, tl.exp(ls_a), tl.exp(lt_a), beta, DIVERGENCE)
        # Pass 2: the loss and W = sum w.
        acc_loss = tl.zeros([BLOCK_R], ACC)
        total_w = tl.zeros([BLOCK_R], ACC)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
            mask = row_ok[:, None] & (cols < V)[None, :]
            xs = tl.load(s_ptr + s_row[:, None] + cols[None, :] * s_sv, mask=mask, other=neg_inf).to(ACC)
            xt = tl.load(t_ptr + t_row[:, None] + cols[None, :] * t_sv, mask=mask, other=neg_inf).to(ACC)
            term, w, ps = _class_share(xs, xt, m_s, m_t, log_z_s, log_z_t, inv_T, beta, h_a, DIVERGENCE)
            acc_loss += tl.sum(tl.where(mask, term, 0.0), axis=1)
            total_w += tl.sum(tl.where(mask, w, 0.0), axis=1)
        loss_scale = T * T if DIVERGENCE != 3 else T
        loss = loss_scale * acc_loss
        coef_a = (T if DIVERGENCE != 3 else 1.0) * scale
        coef_b = total_w
    loss = tl.where(overflow, float("nan"), loss)
    tl.store(loss_ptr + rows, tl.where(ignored, 0.0, loss), mask=row_ok)

    if COMPUTE_GRAD:
        g_row = a_idx * g_sa + i_idx * g_si
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
            mask = row_ok[:, None] & (cols < V)[None, :]
            xs = tl.load(s_ptr + s_row[:, None] + cols[None, :] * s_sv, mask=mask, other=neg_inf).to(ACC)
            xt = tl.load(t_ptr + t_row[:, None] + cols[None, :] * t_sv, mask=mask, other=neg_inf).to(ACC)
            e_s = tl.exp((xs - m_s[:, None]) * inv_T)
            if DIVERGENCE == 0:
                out = coef_a[:, None] * e_s - coef_b[:, None] * tl.exp((xt - m_t[:, None]) * inv_T)
                if DECOUPLED:
                    out = tl.where(cols[None, :] == g[:, None], grad_g[:, None], out)
            elif DIVERGENCE == 1:
                d = ((xs - m_s[:, None]) - (xt - t_a[:, None])) * inv_T
                out = tl.where(e_s > 0.0, coef_a[:, None] * e_s * (d - coef_b[:, None]), 0.0)
            else:
                term_g, w, ps = _class_share(xs, xt, m_s, m_t, log_z_s, log_z_t, inv_T, beta, h_a, DIVERGENCE)
                out = coef_a[:, None] * (w - ps * coef_b[:, None])
            out = tl.where(overflow[:, None], float("nan"), out)
            out = tl.where(ignored[:, None], 0.0, out)  # exact zeros, even for NaN input
            tl.store(grad_ptr + g_row[:, None] + cols[None, :] * g_sv,
                     out.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _class_share(xs, xt, m_s, m_t, log_z_s, log_z_t, inv_T, beta, h_a, DIVERGENCE: tl.constexpr):
    """JSD, TVD: a tile's loss terms, w = q (h - h_a) and q from its logits."""
    ls = (xs - m_s[:, None]) * inv_T - log_z_s[:, None]
    lt = (xt - m_t[:, None]) * inv_T - log_z_t[:, None]
    d = ((xt - m_t[:, None]) - (xs - m_s[:, None])) * inv_T + (log_z_s - log_z_t)[:, None]
    ps = tl.exp(ls)
    term, qh, h = _divergence_terms(d, ps, tl.exp(lt), beta, DIVERGENCE)
    return term, _divergence_weight(qh, h, ps, h_a[:, None], DIVERGENCE), ps


@on_inputs_device
def softmax_kl_triton(s, t, target, scale, dim, T, ignore_index, alpha, beta, decoupled, compute_grad,
                      divergence="forward_kl", jsd_beta=0.5):
    """Same contract as torch.ops.kdfast_C.softmax_kl: (row losses, gradient or empty)."""
    s3, t3 = _as_avi(s, dim), _as_avi(t, dim)
    A, V, I = s3.shape
    n_rows = A * I
    acc = acc_dtype(s.dtype)
    row_loss = torch.empty(s.shape[:dim] + s.shape[dim + 1:], dtype=acc, device=s.device)
    grad, g3 = _gradient_like(s, s3, compute_grad)
    block_r, block_v, warps = _tiles(s3, s.element_size())
    _softmax_kl_kernel[(triton.cdiv(n_rows, block_r),)](
        s3, t3, g3, target.reshape(-1) if target is not None else row_loss, row_loss, scale,
        n_rows, V, I,
        s3.stride(0), s3.stride(1), s3.stride(2),
        t3.stride(0), t3.stride(1), t3.stride(2),
        g3.stride(0), g3.stride(1), g3.stride(2),
        *fp32_halves(T), *fp32_halves(alpha), *fp32_halves(beta), *fp32_halves(jsd_beta), int(ignore_index),
        DIVERGENCE=DIVERGENCE_CODES[divergence], HAS_TARGET=target is not None, DECOUPLED=bool(decoupled),
        COMPUTE_GRAD=compute_grad, ACC=tl.float64 if acc == torch.float64 else tl.float32,
        BLOCK_R=block_r, BLOCK_V=block_v, num_warps=warps,
    )
    return row_loss, grad


def _gradient_like(s, s3, compute_grad):
    """The gradient (empty_like(s), or contiguous where that cannot be seen as [A, V, I]) and
    its [A, V, I] view; an empty tensor (and s's view) without a gradient."""
    if not compute_grad:
        return s.new_empty(0), s3
    grad = torch.empty_like(s)
    try:
        return grad, grad.view(s3.shape)
    except RuntimeError:
        grad = torch.empty(s.shape, dtype=s.dtype, device=s.device)
        return grad, grad.view(s3.shape)


@triton.jit
def _topk_class_share(s_row, idx_row, lp_row, c0, k, V, ref, ref_t, log_z, log_z_t, inv_T, beta, h_a,
                      ACC: tl.constexpr, BLOCK_K: tl.constexpr, DIVERGENCE: tl.constexpr):
    """Entries c0 .. c0 + BLOCK_K of a row's top-k: their class indices, whether each is a
    valid entry, and their loss terms, w = q' (h - h_a) and q' over the coarse classes."""
    cs = c0 + tl.arange(0, BLOCK_K)
    idx = tl.load(idx_row + cs, mask=cs < k, other=0)
    ok = (cs < k) & (idx >= 0) & (idx < V)
    xs = tl.load(s_row + idx, mask=ok, other=float("-inf")).to(ACC) - ref
    xt = tl.load(lp_row + cs, mask=cs < k, other=float("-inf")).to(ACC) - ref_t
    ps = tl.exp(xs * inv_T - log_z)
    d = (xt - xs) * inv_T + (log_z - log_z_t)
    term, qh, h = _divergence_terms(d, ps, tl.exp(xt * inv_T - log_z_t), beta, DIVERGENCE)
    return idx, ok, term, _divergence_weight(qh, h, ps, h_a, DIVERGENCE), ps


@triton.jit(do_not_specialize=["n_rows", "k", "ignore_index"])
def _softmax_kl_topk_kernel(
    s_ptr, idx_ptr, lp_ptr, grad_ptr, target_ptr, loss_ptr, scale_ptr, bitmap_ptr,
    n_rows, V, k, n_words, s_sr, g_sr,
    T_hi, T_lo, beta_hi, beta_lo, ignore_index,
    DIVERGENCE: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_TARGET: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One row at a time per program (rows pid, pid + grid, ...): the student row [V] (class
    stride 1), the teacher's k indices and log-probabilities. bitmap_ptr: the program's
    n_words int32 words marking the row's top-k classes (validity checks, the tail)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    bitmap = bitmap_ptr + pid.to(tl.int64) * n_words
    T = join_halves(T_hi, T_lo, ACC)
    beta = join_halves(beta_hi, beta_lo, ACC)
    inv_T = 1.0 / T
    neg_inf = float("-inf")
    scale = tl.load(scale_ptr).to(ACC)
    loss_scale = T * T if DIVERGENCE != 3 else T
    grad_scale = (T if DIVERGENCE != 3 else 1.0) * scale
    for row in range(pid, n_rows, programs):
        row64 = tl.cast(row, tl.int64)
        s_row = s_ptr + row64 * s_sr
        k_row = row64 * k
        if HAS_TARGET:
            ignored = tl.load(target_ptr + row64) == ignore_index
        else:
            ignored = row64 < 0

        # The top-k classes: marked in the bitmap; out of range or repeated: the row is NaN.
        for w0 in range(0, n_words, BLOCK_V):
            words = w0 + tl.arange(0, BLOCK_V)
            tl.store(bitmap + words, tl.zeros([BLOCK_V], tl.int32), mask=words < n_words)
        tl.debug_barrier()
        n_bad = tl.zeros([], tl.int32)
        for c0 in range(0, k, BLOCK_K):
            cs = c0 + tl.arange(0, BLOCK_K)
            idx = tl.load(idx_ptr + k_row + cs, mask=cs < k, other=0)
            ok = (cs < k) & (idx >= 0) & (idx < V)
            bit = (1 << (idx & 31)).to(tl.int32)
            old = tl.atomic_or(bitmap + (idx >> 5), bit, mask=ok)
            repeated = ok & ((old & bit) != 0)
            n_bad += tl.sum((((cs < k) & ~ok) | repeated).to(tl.int32), axis=0)
        bad = n_bad > 0
        tl.debug_barrier()

        # The student's statistics over K: their maximum; bucket also the tail (the classes
        # outside K), online, on its own maximum: log q_tail stays exact (log space) when
        # the tail's mass underflows next to K's.
        m_k = tl.full([], neg_inf, ACC)
        lp_a = tl.zeros([], ACC)  # the teacher's log-probability at the student's argmax over K
        for c0 in range(0, k, BLOCK_K):
            cs = c0 + tl.arange(0, BLOCK_K)
            idx = tl.load(idx_ptr + k_row + cs, mask=cs < k, other=0)
            ok = (cs < k) & (idx >= 0) & (idx < V)
            x = tl.load(s_row + idx, mask=ok, other=neg_inf).to(ACC)
            tile_max = tl.max(x, axis=0)
            first = tl.min(tl.where(x == tile_max, cs, k), axis=0)
            lp = tl.sum(tl.where(cs == first, tl.load(lp_ptr + k_row + cs, mask=cs < k, other=0.0).to(ACC), 0.0), 0)
            lp_a = tl.where(tile_max > m_k, lp, lp_a)
            m_k = tl.maximum(m_k, tile_max)
        m_tail = tl.full([], neg_inf, ACC)
        z_tail = tl.zeros([], ACC)
        if not RENORMALIZE:
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                in_k = ((tl.load(bitmap + (cols >> 5), mask=cols < V, other=0) >> (cols & 31)) & 1) != 0
                x = tl.load(s_row + cols, mask=(cols < V) & ~in_k, other=neg_inf).to(ACC)
                new = tl.maximum(m_tail, tl.max(x, axis=0))
                ref_tail = tl.where(new == neg_inf, 0.0, new)
                f = tl.exp((m_tail - ref_tail) * inv_T)  # 0 when nothing was seen (m = -inf)
                z_tail = z_tail * f + tl.sum(tl.exp((x - ref_tail) * inv_T), axis=0)
                m_tail = new
        m = tl.maximum(m_k, m_tail)
        ref = tl.where(m == neg_inf, 0.0, m)
        z = z_tail * tl.exp((m_tail - ref) * inv_T)
        for c0 in range(0, k, BLOCK_K):
            cs = c0 + tl.arange(0, BLOCK_K)
            idx = tl.load(idx_ptr + k_row + cs, mask=cs < k, other=0)
            ok = (cs < k) & (idx >= 0) & (idx < V)
            z += tl.sum(tl.exp((tl.load(s_row + idx, mask=ok, other=neg_inf).to(ACC) - ref) * inv_T), axis=0)
        log_z = tl.log(z)
        ref_tail = tl.where(m_tail == neg_inf, 0.0, m_tail)

        # The teacher over K. bucket: log p as stored and sum p (its tail is 1 - sum p);
        # renormalize: logprobs/T centred and renormalised over K.
        ref_t = tl.zeros([], ACC)
        if RENORMALIZE:
            m_t = tl.full([], neg_inf, ACC)
            for c0 in range(0, k, BLOCK_K):
                cs = c0 + tl.arange(0, BLOCK_K)
                m_t = tl.maximum(m_t, tl.max(tl.load(lp_ptr + k_row + cs, mask=cs < k, other=neg_inf).to(ACC), 0))
            ref_t = tl.where(m_t == neg_inf, 0.0, m_t)
        z_t = tl.zeros([], ACC)
        for c0 in range(0, k, BLOCK_K):
            cs = c0 + tl.arange(0, BLOCK_K)
            lp = tl.load(lp_ptr + k_row + cs, mask=cs < k, other=neg_inf).to(ACC)
            z_t += tl.sum(tl.exp((lp - ref_t) * inv_T), axis=0)
        log_z_t = tl.zeros([], ACC)
        if RENORMALIZE:
            log_z_t = tl.log(z_t)

        # The coarse problem: the loss and W = sum w, w = q' (h - h_a), over K and the tail
        # class, anchored on the student's most probable coarse class a (divergence_weight).
        ls_a = (m_k - ref) * inv_T - log_z
        lt_a = (lp_a - ref_t) * inv_T - log_z_t
        if not RENORMALIZE:  # the tail class, when some class is outside K
            p_tail = 1.0 - z_t
            has_tail = k < V
            lt_tail = tl.where(has_tail & (p_tail > 0.0), tl.log(tl.maximum(p_tail, 0.0)), neg_inf)
            ls_tail = tl.where(has_tail, (ref_tail - ref) * inv_T + tl.log(z_tail) - log_z, neg_inf)
            q_tail = tl.exp(ls_tail)
            tail_first = ls_tail > ls_a
            ls_a = tl.where(tail_first, ls_tail, ls_a)
            lt_a = tl.where(tail_first, lt_tail, lt_a)
        loss_a, qh_a, h_a = _divergence_terms(lt_a - ls_a, tl.exp(ls_a), tl.exp(lt_a), beta, DIVERGENCE)
        acc_loss = tl.zeros([], ACC)
        total_w = tl.zeros([], ACC)
        for c0 in range(0, k, BLOCK_K):
            idx, ok, term, w, ps = _topk_class_share(s_row, idx_ptr + k_row, lp_ptr + k_row, c0, k, V, ref, ref_t,
                                                     log_z, log_z_t, inv_T, beta, h_a, ACC, BLOCK_K, DIVERGENCE)
            acc_loss += tl.sum(tl.where(ok, term, 0.0), axis=0)
            total_w += tl.sum(tl.where(ok, w, 0.0), axis=0)
        w_tail = tl.zeros([], ACC)
        q_tail_ = tl.zeros([], ACC)
        if not RENORMALIZE:
            term_t, qh_t, h_t = _divergence_terms(lt_tail - ls_tail, q_tail, tl.exp(lt_tail), beta, DIVERGENCE)
            w_t = _divergence_weight(qh_t, h_t, q_tail, h_a, DIVERGENCE)
            acc_loss += tl.where(has_tail, term_t, 0.0)
            w_tail = tl.where(has_tail, w_t, 0.0)
            q_tail_ = tl.where(has_tail, q_tail, 0.0)
            total_w += w_tail
        nan_row = bad | _overflows(m, inv_T)
        loss = tl.where(nan_row, float("nan"), loss_scale * acc_loss)
        tl.store(loss_ptr + row64, tl.where(ignored, 0.0, loss))

        if COMPUTE_GRAD:
            g_row = grad_ptr + row64 * g_sr
            # outside K (bucket): the tail's coarse gradient w_tail - q_tail W spread in
            # proportion to the student's softmax within the tail; 0 for renormalize
            c_tail = tl.where(z_tail > 0.0, grad_scale * (w_tail - q_tail_ * total_w) / z_tail, 0.0)
            c_tail = tl.where(nan_row, float("nan"), c_tail)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                in_k = ((tl.load(bitmap + (cols >> 5), mask=cols < V, other=0) >> (cols & 31)) & 1) != 0
                if RENORMALIZE:
                    out = tl.zeros([BLOCK_V], ACC) + c_tail
                else:
                    x = tl.load(s_row + cols, mask=cols < V, other=neg_inf).to(ACC)
                    out = c_tail * tl.exp((x - ref_tail) * inv_T)
                out = tl.where(ignored, 0.0, out)  # exact zeros, even for NaN input
                tl.store(g_row + cols, out.to(grad_ptr.dtype.element_ty), mask=(cols < V) & (~in_k | bad))
            for c0 in range(0, k, BLOCK_K):  # in K: q'_c h_c - q'_c H, the coarse gradient
                idx, ok, term_g, w, ps = _topk_class_share(s_row, idx_ptr + k_row, lp_ptr + k_row, c0, k, V, ref,
                                                           ref_t, log_z, log_z_t, inv_T, beta, h_a, ACC, BLOCK_K,
                                                           DIVERGENCE)
                out = tl.where(ignored, 0.0, grad_scale * (w - ps * total_w))
                tl.store(g_row + idx, out.to(grad_ptr.dtype.element_ty), mask=ok & ~bad)
        tl.debug_barrier()  # the bitmap is cleared for the next row only after every read


@on_inputs_device
def softmax_kl_topk_triton(s, indices, logprobs, target, scale, T, ignore_index, divergence, jsd_beta, renormalize,
                           compute_grad):
    """Same contract as torch.ops.kdfast_C.softmax_kl_topk: s [..., V] (class dim last),
    indices int64 and logprobs (accumulation dtype) [..., k] contiguous; (row losses,
    gradient [..., V] contiguous, or empty)."""
    V, k = s.shape[-1], indices.shape[-1]
    s2 = s.reshape(-1, V)
    if V > 1 and s2.stride(1) != 1:
        s2 = s2.contiguous()
    n_rows = s2.shape[0]
    acc = acc_dtype(s.dtype)
    row_loss = torch.empty(s.shape[:-1], dtype=acc, device=s.device)
    grad = torch.empty(s.shape, dtype=s.dtype, device=s.device) if compute_grad else s.new_empty(0)
    g_stride = V if compute_grad else 0
    programs = max(1, min(n_rows, 4 * _multiprocessors(s.device)))
    n_words = triton.cdiv(V, 32)
    bitmap = torch.empty(programs, n_words, dtype=torch.int32, device=s.device)
    block_v = min(max(triton.next_power_of_2(V), 128), 4096)
    block_k = min(max(triton.next_power_of_2(k), 16), 1024)
    _softmax_kl_topk_kernel[(programs,)](
        s2, indices, logprobs, grad if compute_grad else s2, target.reshape(-1) if target is not None else row_loss,
        row_loss, scale, bitmap,
        n_rows, V, k, n_words, s2.stride(0), g_stride,
        *fp32_halves(T), *fp32_halves(jsd_beta), int(ignore_index),
        DIVERGENCE=DIVERGENCE_CODES[divergence], RENORMALIZE=bool(renormalize), HAS_TARGET=target is not None,
        COMPUTE_GRAD=compute_grad, ACC=tl.float64 if acc == torch.float64 else tl.float32,
        BLOCK_V=block_v, BLOCK_K=block_k, num_warps=8 if block_v >= 2048 else 4,
    )
    return row_loss, grad


def _multiprocessors(device) -> int:
    if device.type != "cuda":
        return 2  # interpreted on the CPU: a few programs exercise the row loop
    return torch.cuda.get_device_properties(device).multi_processor_count
