"""Relational losses: RKD distance and angle, PKT, similarity preserving.

The ``*_ref`` functions are the canonical definitions (lenscloth/RKD, RepDistiller, Tung &
Mori; fasterai for similarity) on embeddings ``[B, D]`` and the torch backend.

The kernels compute every loss from one Gram matrix per model (math and gradient in
csrc/relational_math.h): ``G = E Eᵀ`` from the platform's matmul (BLAS, cuBLAS), in float32
(float64 for float64 inputs), then a fused kernel (C++ CPU, Triton, CUDA) turns ``G_s`` and
``G_t`` into the loss and ``S = dL/dG_s + dL/dG_sᵀ`` ([B, B]). The backward pass is one
matmul, ``dL/dE_s = S E_s``. RKD works on the centred embeddings ``X = E - mean(E)``
(distances and angles do not change, and a large common offset no longer cancels in G); as
every row of its S sums to zero, ``S X`` is also the gradient with respect to E. The angle
loss never builds the reference's [B, B, D] tensor: memory O(B² + B·D).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .. import _verify
from .._dtypes import acc_dtype
from ._op import Kernels, fused_op, needs_grad
from ._saved_grad import scale_saved_grad

# Two samples whose squared distance is within this many roundings of their Gram entries,
# times sqrt(D), count as one (duplicates): RKD gives them the reference's values for equal
# rows (pdist's 1e-12 clamp, a zero normalised difference) instead of amplified rounding.
COINCIDENCE_ROUNDINGS = 4.0

# Low-precision embeddings are converted to float32 (or split into bfloat16 halves) for the
# matmuls in blocks of columns of at most this many elements (16 MB in float32): the extra
# memory stays bounded whatever the width of the embeddings.
UPCAST_BLOCK = 1 << 22

# cuBLAS's bfloat16 matmul with a float32 result (tensor cores), where this torch has it.
_MM_FLOAT32_OUT = hasattr(torch.ops.aten.mm, "dtype")


def _embed(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(acc_dtype(x.dtype))


def pairwise_distance_ref(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """RKD's ``pdist``: sqrt(clamp(|e_i|² + |e_j|² - 2 e_i·e_j, eps)) with a zero diagonal."""
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def rkd_distance_ref(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between the distance matrices, each divided by its mean positive distance."""
    with torch.no_grad():
        d_t = pairwise_distance_ref(_embed(e_t))
        d_t = d_t / d_t[d_t > 0].mean()
    d_s = pairwise_distance_ref(_embed(e_s))
    d_s = d_s / d_s[d_s > 0].mean()
    return F.smooth_l1_loss(d_s, d_t)


def angles_ref(e: torch.Tensor) -> torch.Tensor:
    """``<normalize(e_j - e_i), normalize(e_k - e_i)>`` for all (i, j, k): the [B, B, D] way."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


def rkd_angle_ref(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between the angle tensors (mean over all B³ triplets)."""
    with torch.no_grad():
        a_t = angles_ref(_embed(e_t))
    return F.smooth_l1_loss(angles_ref(_embed(e_s)), a_t)


def rkd_ref(e_s: torch.Tensor, e_t: torch.Tensor, dist_weight: float = 25.0,
            angle_weight: float = 50.0) -> torch.Tensor:
    """``dist_weight·L_distance + angle_weight·L_angle``; a term of weight 0 is not computed."""
    loss = e_s.new_zeros((), dtype=acc_dtype(e_s.dtype, e_t.dtype))
    if dist_weight:
        loss = loss + dist_weight * rkd_distance_ref(e_s, e_t)
    if angle_weight:
        loss = loss + angle_weight * rkd_angle_ref(e_s, e_t)
    return loss


def _pkt_probabilities(e: torch.Tensor, eps: float) -> torch.Tensor:
    x = e / (e.pow(2).sum(1, keepdim=True).sqrt() + eps)
    x = torch.nan_to_num(x, nan=0.0)
    k = (x @ x.t() + 1.0) / 2.0
    return k / k.sum(1, keepdim=True)


def pkt_ref(e_s: torch.Tensor, e_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas): KL of the cosine-kernel
    conditionals, ``mean over B² of P_t log((P_t + eps) / (P_s + eps))``."""
    p_s = _pkt_probabilities(_embed(e_s), eps)
    with torch.no_grad():
        p_t = _pkt_probabilities(_embed(e_t), eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def similarity_preserving_ref(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2) -> torch.Tensor:
    """MSE between the row-normalised (p-norm) Gram matrices of the flattened features."""
    e_s, e_t = _embed(f_s), _embed(f_t.detach())
    g_s = F.normalize(e_s @ e_s.t(), p=p, dim=1)
    g_t = F.normalize(e_t @ e_t.t(), p=p, dim=1)
    return F.mse_loss(g_s, g_t)


# --- Gram matrices and the backward matmul ---

def coincidence_tol(dtype: torch.dtype, width: int) -> float:
    """Relative squared distance under which RKD counts two samples as one."""
    return COINCIDENCE_ROUNDINGS * torch.finfo(dtype).eps * math.sqrt(width)


def _split_matmuls(x: torch.Tensor) -> bool:
    """Whether the matmuls on x run as bfloat16 tensor-core products (see _gram)."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _MM_FLOAT32_OUT


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bfloat16 ``a @ b`` with float32 accumulation and result (exact products)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # the same numbers, for testing the split on the CPU


def _split_bf16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 x as hi + lo, two bfloat16 tensors (x - hi - lo is ~2^-18 |x|)."""
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.float()).to(torch.bfloat16)


def _gram_block(x: torch.Tensor, split: bool) -> torch.Tensor:
    """``x xᵀ`` in float32 (float64), x in that dtype or bfloat16.

    With ``split`` (low-precision inputs on a GPU) the float32 product runs on tensor cores
    as ``hi hiᵀ + C + Cᵀ``, ``C = hi loᵀ`` (bfloat16 hi/lo halves of x, float32 results;
    relative error ~2^-17 per product): two bfloat16 matmuls instead of one float32 one.
    """
    if not split:
        return x @ x.t()
    if x.dtype == torch.bfloat16:  # exact in bfloat16 already
        return _mm_float32(x, x.t())
    hi, lo = _split_bf16(x.float())
    cross = _mm_float32(hi, lo.t())
    return _mm_float32(hi, hi.t()).add_(cross).add_(cross.t())


def _grad_block(S: torch.Tensor, y: torch.Tensor, split: bool) -> torch.Tensor:
    """``S y`` in S's dtype: the input gradient from S = dL/dG + dL/dGᵀ."""
    if not split:
        return S @ y.to(S.dtype)
    s_hi, s_lo = _split_bf16(S)
    if y.dtype == torch.bfloat16:
        return _mm_float32(s_hi, y).add_(_mm_float32(s_lo, y))
    y_hi, y_lo = _split_bf16(y.float())
    return _mm_float32(s_hi, y_hi).add_(_mm_float32(s_hi, y_lo)).add_(_mm_float32(s_lo, y_hi))


def _column_blocks(e: torch.Tensor, acc: torch.dtype) -> list[slice]:
    """The column ranges in which e is converted: all of e at once when it is already in
    the accumulation dtype, else blocks of at most UPCAST_BLOCK elements (bounded memory)."""
    D = e.shape[1]
    if e.dtype == acc:
        return [slice(0, D)]
    width = max(1, UPCAST_BLOCK // max(e.shape[0], 1))
    return [slice(c, min(c + width, D)) for c in range(0, D, width)]


def _operand(e: torch.Tensor, acc: torch.dtype, split: bool, mean: torch.Tensor | None) -> torch.Tensor:
    """Columns of e as a matmul operand: minus their mean (RKD), in the accumulation dtype,
    or kept in bfloat16 for the split matmul."""
    if mean is not None:
        return e.to(acc) - mean
    return e if split and e.dtype == torch.bfloat16 else e.to(acc)


def _gram(e: torch.Tensor, acc: torch.dtype, mean: torch.Tensor | None = None) -> torch.Tensor:
    """``X Xᵀ`` in the accumulation dtype, X = e or e - mean, summed over column blocks.

    Centred columns (RKD) are float32 already: they take a float32 product, not the
    bfloat16 split, whose ~2^-17 error would show in distances between close samples."""
    split = _split_matmuls(e) and mean is None
    g = None
    for cols in _column_blocks(e, acc):
        m = None if mean is None else mean[cols]
        block = _gram_block(_operand(e[:, cols], acc, split, m), split)
        g = block if g is None else g.add_(block)
    return g


def _grad(S: torch.Tensor, e: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """``S X`` in e's dtype, X = e or e - mean, block by block of columns."""
    split = _split_matmuls(e) and mean is None
    blocks = _column_blocks(e, S.dtype)
    if len(blocks) == 1:
        return _grad_block(S, _operand(e, S.dtype, split, mean), split).to(e.dtype)
    out = torch.empty(e.shape, dtype=e.dtype, device=e.device)
    for cols in blocks:
        m = None if mean is None else mean[cols]
        out[:, cols] = _grad_block(S, _operand(e[:, cols], S.dtype, split, m), split)
    return out


@contextlib.contextmanager
def _float_matmuls(x: torch.Tensor):
    """Autocast and TF32 off: the Grams and the gradient keep the dtypes and precision
    chosen here, also inside an autocast region or under
    ``torch.set_float32_matmul_precision("high")`` (TF32's ~2^-11 would swamp the small
    distances RKD takes as differences of Gram entries)."""
    with torch.autocast(x.device.type, enabled=False):
        if not x.is_cuda:
            yield
            return
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32


# --- custom ops ---

# The fused epilogues rkd_gram, pkt_gram, similarity_gram (torch.ops.kdfast_C on cpu and
# cuda, the same names in kdfast/triton/relational.py).
KERNELS = Kernels("relational")


@fused_op("kdfast::rkd", grads=("e_s",))
def rkd(e_s: torch.Tensor, e_t: torch.Tensor, dist_weight: float, angle_weight: float, compute_grad: bool,
        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RKD on embeddings [B, D_s], [B, D_t]: (loss, S, the student's column means μ); S and
    μ are empty without compute_grad. The gradient with respect to e_s is S (e_s - μ)."""
    acc = acc_dtype(e_s.dtype, e_t.dtype)
    mean_s, mean_t = e_s.mean(0, dtype=acc), e_t.mean(0, dtype=acc)
    with _float_matmuls(e_s):
        g_s, g_t = _gram(e_s, acc, mean_s), _gram(e_t, acc, mean_t)
    tol = coincidence_tol(acc, max(e_s.shape[1], e_t.shape[1]))
    loss, S = KERNELS("rkd_gram", backend)(g_s, g_t, dist_weight, angle_weight, tol, compute_grad)
    return loss, S, mean_s if compute_grad else mean_s.new_empty(0)


@rkd.register_fake
def _(e_s, e_t, dist_weight, angle_weight, compute_grad, backend):
    acc = acc_dtype(e_s.dtype, e_t.dtype)
    B, D = e_s.shape
    return (e_s.new_empty((), dtype=acc), e_s.new_empty((B, B) if compute_grad else (0,), dtype=acc),
            e_s.new_empty((D,) if compute_grad else (0,), dtype=acc))


def _rkd_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2], inputs.e_s)  # S and μ: by-products, not differentiated


def _rkd_backward(ctx, grad_loss):
    S, mean, e_s = ctx.saved_tensors
    with _float_matmuls(e_s):
        return _grad(scale_saved_grad(S, grad_loss), e_s, mean)


rkd.register_autograd(_rkd_backward, setup_context=_rkd_setup_context)


def _gram_pair(e_s: torch.Tensor, e_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The uncentred Gram matrices of student and teacher (PKT, similarity)."""
    acc = acc_dtype(e_s.dtype, e_t.dtype)
    with _float_matmuls(e_s):
        return _gram(e_s, acc), _gram(e_t, acc)


@fused_op("kdfast::pkt", grads=("e_s",))
def pkt(e_s: torch.Tensor, e_t: torch.Tensor, eps: float, compute_grad: bool,
        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PKT on embeddings [B, D_s], [B, D_t]: (loss, S, the student's zeroed samples), the
    last two empty without compute_grad. A sample holding a NaN or an infinite value counts
    as a zero vector (its squared norm G_ii is not finite: the kernels give it c_i = 0, so
    its rows and columns of S are 0); see _pkt_backward for its gradient."""
    g_s, g_t = _gram_pair(e_s, e_t)
    loss, S = KERNELS("pkt_gram", backend)(g_s, g_t, eps, compute_grad)
    zeroed = ~torch.isfinite(g_s.diagonal()) if compute_grad else g_s.new_empty(0, dtype=torch.bool)
    return loss, S, zeroed


@pkt.register_fake
def _(e_s, e_t, eps, compute_grad, backend):
    B = e_s.shape[0]
    acc = acc_dtype(e_s.dtype, e_t.dtype)
    return (e_s.new_empty((), dtype=acc), e_s.new_empty((B, B) if compute_grad else (0,), dtype=acc),
            e_s.new_empty((B,) if compute_grad else (0,), dtype=torch.bool))


def _pkt_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2], inputs.e_s)  # S and the zeroed samples: by-products


def _pkt_backward(ctx, grad_loss):
    """``S e_s``, except on the zeroed samples. The reference (nan_to_num of x / |x|) gives
    them a NaN gradient row and the other samples a finite one; in ``S e_s`` their NaN or
    inf would reach every sample through column j (0 · NaN), so they are zeroed for the
    product and their rows set to NaN after it. On the CPU the check is free and a batch
    without such samples skips both passes; elsewhere (and when traced) they always run,
    without waiting for the device."""
    S, zeroed, e_s = ctx.saved_tensors
    S = scale_saved_grad(S, grad_loss)
    if type(zeroed) is torch.Tensor and zeroed.device.type == "cpu" and not bool(zeroed.any()):
        with _float_matmuls(e_s):
            return _grad(S, e_s)
    zeroed = zeroed.unsqueeze(1)
    with _float_matmuls(e_s):
        return _grad(S, e_s.masked_fill(zeroed, 0)).masked_fill_(zeroed, float("nan"))


pkt.register_autograd(_pkt_backward, setup_context=_pkt_setup_context)


@fused_op("kdfast::similarity_preserving", grads=("f_s",))
def similarity_preserving(f_s: torch.Tensor, f_t: torch.Tensor, p: float, compute_grad: bool,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity preserving on flattened features [B, D_s], [B, D_t]: (loss, S or empty)."""
    g_s, g_t = _gram_pair(f_s, f_t)
    return KERNELS("similarity_gram", backend)(g_s, g_t, p, compute_grad)


def _gram_loss_fake(e_s, e_t, option, compute_grad, backend):
    B = e_s.shape[0]
    acc = acc_dtype(e_s.dtype, e_t.dtype)
    return e_s.new_empty((), dtype=acc), e_s.new_empty((B, B) if compute_grad else (0,), dtype=acc)


def _gram_loss_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[0])  # S (a by-product) and the student's e_s / f_s


def _gram_loss_backward(ctx, grad_loss):
    S, e_s = ctx.saved_tensors
    with _float_matmuls(e_s):
        return _grad(scale_saved_grad(S, grad_loss), e_s)


similarity_preserving.register_fake(_gram_loss_fake)
similarity_preserving.register_autograd(_gram_loss_backward, setup_context=_gram_loss_setup_context)


# --- entry points (inputs validated by kdfast.functional) ---

def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _backend_for(op, e_s, e_t, path, call):
    """The backend for a call (auto's first use of a GPU kernel path is verified on the first
    samples of the batch)."""
    k = _verify.RELATIONAL_SAMPLES
    return KERNELS.backend(op, e_s.device, _verify.first_use("relational", op, e_s.device, e_s.dtype, lambda _: path,
                                                             lambda: _verify.Slice(call, [e_s[:k], e_t[:k]], 1)))


def rkd_loss(e_s, e_t, dist_weight=25.0, angle_weight=50.0, op="rkd"):
    """Weighted RKD distance + angle from one Gram matrix per model."""
    e_t = e_t.detach()
    path = "+".join(name for name, w in (("distance", dist_weight), ("angle", angle_weight)) if w) or "none"
    backend = _backend_for(op, e_s, e_t, path, lambda s, t: rkd_loss(s, t, dist_weight, angle_weight, op))
    if backend == "torch":
        return rkd_ref(e_s, e_t, dist_weight, angle_weight)
    return rkd(_flat(e_s), _flat(e_t), float(dist_weight), float(angle_weight), needs_grad(e_s), backend)[0]


def pkt_loss(e_s, e_t, eps=1e-7):
    e_t = e_t.detach()
    backend = _backend_for("pkt", e_s, e_t, "gram", lambda s, t: pkt_loss(s, t, eps))
    if backend == "torch":
        return pkt_ref(e_s, e_t, eps)
    return pkt(_flat(e_s), _flat(e_t), float(eps), needs_grad(e_s), backend)[0]


def similarity_preserving_loss(f_s, f_t, p=2):
    f_t = f_t.detach()
    path = {1: "p1", 2: "p2"}.get(p, "p")
    backend = _backend_for("similarity_preserving", f_s, f_t, path, lambda s, t: similarity_preserving_loss(s, t, p))
    if backend == "torch":
        return similarity_preserving_ref(f_s, f_t, p)
    return similarity_preserving(_flat(f_s), _flat(f_t), float(p), needs_grad(f_s), backend)[0]
