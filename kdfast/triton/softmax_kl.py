"""Fused temperature-softmax KL in Triton (math: csrc/softmax_kl_math.h).

One program takes BLOCK_R rows and walks their classes in tiles of BLOCK_V:
pass 1 keeps an online max, sum of exponentials and teacher-weighted logit gap per row;
the row's loss and gradient constants follow; pass 2 writes
``grad_j = a·exp((s_j - M_s)/T) - b·exp((t_j - M_t)/T)``. Rows with contiguous classes run
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
    big = x * inv_T
    return (big - big != 0.0) & (x - x == 0.0)


@triton.jit
def _xlogy(x, log_y):
    return tl.where(x == 0.0, 0.0, x * log_y)


# The row count is not specialised (fewer compiled variants). Sizes and strides are: a
# stride of 1 makes loads contiguous, I == 1 drops the inner index, and V and the row
# strides divisible by 16 let rows load in 16-byte vectors.
@triton.jit(do_not_specialize=["n_rows", "ignore_index"])
def _softmax_kl_kernel(
    s_ptr, t_ptr, grad_ptr, target_ptr, loss_ptr, scale_ptr,
    n_rows, V, I,
    s_sa, s_sv, s_si, t_sa, t_sv, t_si, g_sa, g_sv, g_si,
    T_hi, T_lo, alpha_hi, alpha_lo, beta_hi, beta_lo, ignore_index,
    HAS_TARGET: tl.constexpr, DECOUPLED: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    a_idx = rows // I
    i_idx = rows % I
    s_row = a_idx * s_sa + i_idx * s_si
    t_row = a_idx * t_sa + i_idx * t_si
    T = join_halves(T_hi, T_lo, ACC)  # float args are fp32 on a GPU: two halves keep fp64
    alpha = join_halves(alpha_hi, alpha_lo, ACC)
    beta = join_halves(beta_hi, beta_lo, ACC)
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

    m_s = tl.full([BLOCK_R], neg_inf, ACC)
    m_t = tl.full([BLOCK_R], neg_inf, ACC)
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
        new_m_s = tl.maximum(m_s, tl.max(xs, axis=1))
        new_m_t = tl.maximum(m_t, tl.max(xt, axis=1))
        # A max that is still -inf (nothing seen yet) is replaced by 0: exp(-inf - 0) = 0.
        ref_s = tl.where(new_m_s == neg_inf, 0.0, new_m_s)
        ref_t = tl.where(new_m_t == neg_inf, 0.0, new_m_t)
        e_s = tl.exp((xs - ref_s[:, None]) * inv_T)
        e_t = tl.exp((xt - ref_t[:, None]) * inv_T)
        rescale_t = tl.exp((m_t - ref_t) * inv_T)
        # cross stays centred on the running maxima (softmax_kl_recentre in csrc/softmax_kl_math.h)
        old_ref_s = tl.where(m_s == neg_inf, 0.0, m_s)
        old_ref_t = tl.where(m_t == neg_inf, 0.0, m_t)
        shift = ((ref_t - old_ref_t) - (ref_s - old_ref_s)) * inv_T
        cross = tl.where(z_t == 0.0, cross, cross - z_t * shift) * rescale_t
        gap = tl.where(e_t > 0.0, e_t * (((xt - ref_t[:, None]) - (xs - ref_s[:, None])) * inv_T), 0.0)
        cross += tl.sum(gap, axis=1)
        z_s = z_s * tl.exp((m_s - ref_s) * inv_T) + tl.sum(e_s, axis=1)
        z_t = z_t * rescale_t + tl.sum(e_t, axis=1)
        m_s = new_m_s
        m_t = new_m_t

    # Row loss and gradient constants (softmax_kl_finish_row in csrc/softmax_kl_math.h).
    scale = tl.load(scale_ptr).to(ACC)
    log_z_s = tl.log(z_s)
    log_z_t = tl.log(z_t)
    kl = cross / z_t + log_z_s - log_z_t
    # x/T overflowing for a finite logit: no softmax, NaN (softmax_kl_overflows)
    overflow = _overflows(m_s, inv_T) | _overflows(m_t, inv_T)
    gs = T * scale
    if DECOUPLED:
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
        loss = T * T * (alpha * tckd + beta * kl)
        coef_s = gs * (beta - alpha * D) / z_s
        coef_t = gs * beta / z_t
        grad_g = gs * alpha * D
    else:
        loss = T * T * kl
        coef_s = gs / z_s
        coef_t = gs / z_t
        grad_g = tl.zeros([BLOCK_R], ACC)
    loss = tl.where(bad_label | overflow, float("nan"), loss)
    coef_s = tl.where(overflow, float("nan"), coef_s)
    grad_g = tl.where(overflow, float("nan"), grad_g)
    tl.store(loss_ptr + rows, tl.where(ignored, 0.0, loss), mask=row_ok)

    if COMPUTE_GRAD:
        g_row = a_idx * g_sa + i_idx * g_si
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)  # cols * stride may pass 2^31
            mask = row_ok[:, None] & (cols < V)[None, :]
            xs = tl.load(s_ptr + s_row[:, None] + cols[None, :] * s_sv, mask=mask, other=0.0).to(ACC)
            xt = tl.load(t_ptr + t_row[:, None] + cols[None, :] * t_sv, mask=mask, other=0.0).to(ACC)
            out = (coef_s[:, None] * tl.exp((xs - m_s[:, None]) * inv_T)
                   - coef_t[:, None] * tl.exp((xt - m_t[:, None]) * inv_T))
            if DECOUPLED:
                out = tl.where(cols[None, :] == g[:, None], grad_g[:, None], out)
            out = tl.where(ignored[:, None], 0.0, out)  # exact zeros, even for NaN input
            tl.store(grad_ptr + g_row[:, None] + cols[None, :] * g_sv,
                     out.to(grad_ptr.dtype.element_ty), mask=mask)


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


@on_inputs_device
def softmax_kl_triton(s, t, target, scale, dim, T, ignore_index, alpha, beta, decoupled, compute_grad):
    """Same contract as torch.ops.kdfast_C.softmax_kl: (row losses, gradient or empty)."""
    s3, t3 = _as_avi(s, dim), _as_avi(t, dim)
    A, V, I = s3.shape
    n_rows = A * I
    rows_shape = s.shape[:dim] + s.shape[dim + 1:]
    acc = acc_dtype(s.dtype)
    row_loss = torch.empty(rows_shape, dtype=acc, device=s.device)
    if compute_grad:
        grad = torch.empty_like(s)
        try:
            g3 = grad.view(A, V, I)
        except RuntimeError:
            grad = torch.empty(s.shape, dtype=s.dtype, device=s.device)
            g3 = grad.view(A, V, I)
    else:
        grad = s.new_empty(0)
        g3 = s3
    target_rows = target.reshape(-1) if target is not None else row_loss  # unused without a target
    block_r, block_v, warps = _tiles(s3, s.element_size())
    grid = (triton.cdiv(n_rows, block_r),)
    _softmax_kl_kernel[grid](
        s3, t3, g3, target_rows, row_loss, scale,
        n_rows, V, I,
        s3.stride(0), s3.stride(1), s3.stride(2),
        t3.stride(0), t3.stride(1), t3.stride(2),
        g3.stride(0), g3.stride(1), g3.stride(2),
        *fp32_halves(T), *fp32_halves(alpha), *fp32_halves(beta), int(ignore_index),
        HAS_TARGET=target is not None, DECOUPLED=decoupled, COMPUTE_GRAD=compute_grad,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        BLOCK_R=block_r, BLOCK_V=block_v, num_warps=warps,
    )
    return row_loss, grad
