"""Fused attention transfer in Triton (math: csrc/attention_math.h).

Per layer pair, forward: one kernel per map for the channel means ``r = mean_c f^p``
(a program takes one sample and BLOCK_X positions and walks the channels in tiles of
BLOCK_C), then one program per sample for the loss and ``w = d loss / d r_s`` (three
sweeps over the sample's X means, which stay in cache). Backward: one kernel writing
``grad = grad_loss · (p / C) · w[b, x] · f^(p-1)`` with a single read of f_s. Every grid
is one axis (a GPU runs at most 65535 programs on axes 1 and 2). Any strides:
positions are addressed as ``(x // X2)·sx1 + (x % X2)·sx2``, which is ``x·sx2`` when the
spatial dims merge into one run (NCHW and channels_last alike).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dtypes import acc_dtype
from . import on_inputs_device
from ._args import fp32_halves, join_halves

_EPS = tl.constexpr(1e-12)  # F.normalize's default (made in ACC: an fp32 literal is not 1e-12)


@triton.jit
def _power(f, e_hi, e_lo, e_int, e_odd, MODE: tl.constexpr):
    """f ** e with torch.pow's semantics (negative f: real for integer e, NaN otherwise).

    MODE 1: e == 1, MODE 2: e == 2 (the default p and its gradient); MODE 0: any e, by
    repeated multiplication when e is an integer up to 64 (e_int >= 0; exact and fast),
    else through exp2/log2 (e_int == -1 for non-integers, -2 for larger integers)."""
    if MODE == 1:
        return f
    elif MODE == 2:
        return f * f
    else:
        by_product = tl.full(f.shape, 1.0, f.dtype)
        for _ in range(e_int):  # (no iteration for e_int < 0)
            by_product = by_product * f
        e = join_halves(e_hi, e_lo, f.dtype)
        mag = tl.exp2(e * tl.log2(tl.abs(f)))
        signed = tl.where((f < 0.0) & (e_odd != 0), -mag, mag)
        real = tl.where((f < 0.0) & (e_int == -1), float("nan"), signed)  # -1: not an integer
        return tl.where(e_int >= 0, by_product, real)


@triton.jit(do_not_specialize=["X2", "s_x1", "p_int", "p_odd"])
def _channel_mean_kernel(
    f_ptr, out_ptr, C, X, X2, s_b, s_c, s_x1, s_x2, p_hi, p_lo, p_int, p_odd,
    SPLIT_X: tl.constexpr, MODE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    x_blocks = tl.cdiv(X, BLOCK_X)
    pid = tl.program_id(0)  # (sample, tile of positions), all on axis 0: axis 1 holds at most 65535
    b = (pid // x_blocks).to(tl.int64)
    xs = (pid % x_blocks) * BLOCK_X + tl.arange(0, BLOCK_X)
    x_ok = xs < X
    xs64 = xs.to(tl.int64)
    if SPLIT_X:
        x_off = (xs64 // X2) * s_x1 + (xs64 % X2) * s_x2
    else:
        x_off = xs64 * s_x2
    base = f_ptr + b * s_b
    acc = tl.zeros([BLOCK_C, BLOCK_X], ACC)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        mask = (cs < C)[:, None] & x_ok[None, :]
        f = tl.load(base + cs.to(tl.int64)[:, None] * s_c + x_off[None, :], mask=mask, other=0.0).to(ACC)
        acc += _power(f, p_hi, p_lo, p_int, p_odd, MODE)  # 0 ** p = 0: masked lanes add 0
    r = tl.sum(acc, axis=0) / tl.cast(C, ACC)
    tl.store(out_ptr + b * X + xs64, r, mask=x_ok)


@triton.jit
def _finish_kernel(rs_ptr, rt_ptr, loss_ptr, B, X, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One sample: w = dL/dr_s written over r_s, and the sample's share of the loss."""
    b = tl.program_id(0).to(tl.int64)
    rs_row = rs_ptr + b * X
    rt_row = rt_ptr + b * X
    ss_s = tl.zeros([BLOCK], ACC)
    ss_t = tl.zeros([BLOCK], ACC)
    for x0 in range(0, X, BLOCK):
        xs = x0 + tl.arange(0, BLOCK)
        rs = tl.load(rs_row + xs, mask=xs < X, other=0.0)
        rt = tl.load(rt_row + xs, mask=xs < X, other=0.0)
        ss_s += rs * rs
        ss_t += rt * rt
    n_s = tl.sqrt(tl.sum(ss_s, axis=0))
    n_t = tl.sqrt(tl.sum(ss_t, axis=0))
    eps = tl.full([], _EPS, ACC)
    inv_s = 1.0 / tl.maximum(n_s, eps)
    inv_t = 1.0 / tl.maximum(n_t, eps)
    sum_d2 = tl.zeros([BLOCK], ACC)
    dot = tl.zeros([BLOCK], ACC)
    for x0 in range(0, X, BLOCK):
        xs = x0 + tl.arange(0, BLOCK)
        a_s = tl.load(rs_row + xs, mask=xs < X, other=0.0) * inv_s
        d = a_s - tl.load(rt_row + xs, mask=xs < X, other=0.0) * inv_t
        sum_d2 += d * d
        dot += a_s * d
    n_elem = tl.cast(B, ACC) * tl.cast(X, ACC)
    scale = 2.0 / n_elem
    coef_d = scale * inv_s
    coef_a = tl.where(n_s > eps, -coef_d * tl.sum(dot, axis=0), 0.0)
    for x0 in range(0, X, BLOCK):
        xs = x0 + tl.arange(0, BLOCK)
        a_s = tl.load(rs_row + xs, mask=xs < X, other=0.0) * inv_s
        d = a_s - tl.load(rt_row + xs, mask=xs < X, other=0.0) * inv_t
        tl.store(rs_row + xs, coef_d * d + coef_a * a_s, mask=xs < X)
    tl.store(loss_ptr + b, tl.sum(sum_d2, axis=0) / n_elem)


@triton.jit(do_not_specialize=["f_X2", "g_X2", "f_sx1", "g_sx1", "pm1_int", "pm1_odd"])
def _grad_kernel(
    f_ptr, g_ptr, w_ptr, go_ptr, C, X, f_X2, g_X2,
    f_sb, f_sc, f_sx1, f_sx2, g_sb, g_sc, g_sx1, g_sx2, p_hi, p_lo, pm1_hi, pm1_lo, pm1_int, pm1_odd,
    SPLIT_X: tl.constexpr, MODE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    x_blocks = tl.cdiv(X, BLOCK_X)
    tiles = x_blocks * tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)  # (sample, tile), all on axis 0: axis 1 holds at most 65535
    b = (pid // tiles).to(tl.int64)
    tile = pid % tiles
    xs = (tile % x_blocks) * BLOCK_X + tl.arange(0, BLOCK_X)
    cs = (tile // x_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    x_ok = xs < X
    mask = (cs < C)[:, None] & x_ok[None, :]
    xs64 = xs.to(tl.int64)
    cs64 = cs.to(tl.int64)
    if SPLIT_X:
        fx = (xs64 // f_X2) * f_sx1 + (xs64 % f_X2) * f_sx2
        gx = (xs64 // g_X2) * g_sx1 + (xs64 % g_X2) * g_sx2
    else:
        fx = xs64 * f_sx2
        gx = xs64 * g_sx2
    p = join_halves(p_hi, p_lo, ACC)
    k = tl.load(go_ptr).to(ACC) * p / tl.cast(C, ACC)
    w = tl.load(w_ptr + b * X + xs64, mask=x_ok, other=0.0) * k
    f = tl.load(f_ptr + b * f_sb + cs64[:, None] * f_sc + fx[None, :], mask=mask, other=0.0).to(ACC)
    grad = w[None, :] * _power(f, pm1_hi, pm1_lo, pm1_int, pm1_odd, MODE)
    tl.store(g_ptr + b * g_sb + cs64[:, None] * g_sc + gx[None, :], grad.to(g_ptr.dtype.element_ty), mask=mask)


def _power_args(e: float) -> tuple[float, float, int, int, int]:
    """(e_hi, e_lo, e_int, e_odd, MODE) for _power."""
    mode = 1 if e == 1 else 2 if e == 2 else 0
    if float(e).is_integer():
        e_int = int(e) if 0 <= e <= 64 else -2
        odd = int(e) % 2
    else:
        e_int, odd = -1, 0
    return (*fp32_halves(e), e_int, odd, mode)


def feature_view(f: torch.Tensor):
    """(B, C, X, X2, s_b, s_c, s_x1, s_x2) of f as [B, C, X] (see csrc/attention.h), or None
    when the spatial dims need more than two runs."""
    runs = []  # (size, stride), innermost first
    for d in range(f.dim() - 1, 1, -1):
        size, stride = f.shape[d], f.stride(d)
        if size == 1:
            continue
        if runs and stride == runs[-1][1] * runs[-1][0]:
            runs[-1] = (runs[-1][0] * size, runs[-1][1])
        elif len(runs) == 2:
            return None
        else:
            runs.append((size, stride))
    inner = runs[0] if runs else (1, 1)
    outer = runs[1] if len(runs) > 1 else (1, 0)
    return f.shape[0], f.shape[1], inner[0] * outer[0], inner[0], f.stride(0), f.stride(1), outer[1], inner[1]


def _viewable(f: torch.Tensor):
    v = feature_view(f)
    if v is None:
        f = f.contiguous()
        v = feature_view(f)
    return f, v


def _blocks(v) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_X, num_warps): tiles long along the contiguous dim. Fixed per layout
    (masks cover small maps), so that few kernel variants get compiled."""
    B, C, X, X2, s_b, s_c, s_x1, s_x2 = v
    if s_c == 1 and not (X2 == X and s_x2 == 1 and X >= 64):  # channels contiguous
        return 64, 32, 4
    return 16, 256, 4


def kernel_path(f_s: list[torch.Tensor], f_t: list[torch.Tensor], p: float) -> str:
    """The kernel variants a call runs: the tiles (BLOCK_C x BLOCK_X, "split" for positions
    in two runs) of every map, and the power's mode, e.g. "16x256+64x32-split/p2"."""
    tiles = set()
    for f in (*f_s, *f_t):
        v = feature_view(f) or feature_view(torch.empty(f.shape, device="meta"))  # (a copy's, if none)
        block_c, block_x, _ = _blocks(v)
        tiles.add(f"{block_c}x{block_x}" + ("-split" if v[3] != v[2] else ""))
    return "+".join(sorted(tiles)) + {1: "/p1", 2: "/p2"}.get(_power_args(p)[-1], "/p")


def _acc(dtype):
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


def _channel_means(f: torch.Tensor, p: float) -> torch.Tensor:
    f, v = _viewable(f)
    B, C, X, X2, s_b, s_c, s_x1, s_x2 = v
    out = torch.empty(B, X, dtype=acc_dtype(f.dtype), device=f.device)
    block_c, block_x, warps = _blocks(v)
    *p_args, mode = _power_args(p)
    _channel_mean_kernel[(triton.cdiv(X, block_x) * B,)](
        f, out, C, X, X2, s_b, s_c, s_x1, s_x2, *p_args,
        SPLIT_X=X2 != X, MODE=mode, ACC=_acc(f.dtype), BLOCK_C=block_c, BLOCK_X=block_x, num_warps=warps)
    return out


@on_inputs_device
def attention_transfer_forward_triton(f_s: list[torch.Tensor], f_t: list[torch.Tensor], p: float):
    """Same contract as torch.ops.kdfast_C.attention_transfer_forward: (loss, maps)."""
    maps, losses = [], []
    for fs, ft in zip(f_s, f_t):
        rs, rt = _channel_means(fs, p), _channel_means(ft, p)
        B, X = rs.shape
        sample_loss = torch.empty(B, dtype=rs.dtype, device=rs.device)
        block = 256 if X <= 256 else 1024
        _finish_kernel[(B,)](rs, rt, sample_loss, B, X, ACC=_acc(fs.dtype), BLOCK=block,
                             num_warps=4 if block <= 512 else 8)
        maps.append(rs)
        losses.append(sample_loss)
    return torch.cat(losses).sum(), maps


@on_inputs_device
def attention_transfer_backward_triton(grad_loss: torch.Tensor, f_s: list[torch.Tensor],
                                       maps: list[torch.Tensor], p: float) -> list[torch.Tensor]:
    """Same contract as torch.ops.kdfast_C.attention_transfer_backward."""
    grads = []
    go = grad_loss.reshape(1)
    for f, w in zip(f_s, maps):
        grad = torch.empty_like(f)  # the fake kernel's layout
        out, vg = _viewable(grad)   # (a contiguous stand-in when grad has no view)
        f, v = _viewable(f)
        B, C, X, f_X2, f_sb, f_sc, f_sx1, f_sx2 = v
        _, _, _, g_X2, g_sb, g_sc, g_sx1, g_sx2 = vg
        block_c, block_x, warps = _blocks(v)
        grid = (triton.cdiv(X, block_x) * triton.cdiv(C, block_c) * B,)
        *pm1_args, mode = _power_args(p - 1)
        _grad_kernel[grid](
            f, out, w.contiguous(), go, C, X, f_X2, g_X2,
            f_sb, f_sc, f_sx1, f_sx2, g_sb, g_sc, g_sx1, g_sx2, *fp32_halves(p), *pm1_args,
            SPLIT_X=f_X2 != X or g_X2 != X, MODE=mode, ACC=_acc(f.dtype), BLOCK_C=block_c, BLOCK_X=block_x,
            num_warps=warps)
        if out is not grad:
            grad.copy_(out)
        grads.append(grad)
    return grads
