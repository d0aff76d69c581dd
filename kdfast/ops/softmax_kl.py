"""Temperature-softmax KL: SoftTarget, Mutual and DecoupledKD behind one fused op.

``soft_target_kl_ref`` and ``decoupled_kd_ref`` are the definitions (and the torch
backend); ``kdfast::softmax_kl`` runs the fused kernels (C++ CPU, Triton, CUDA), which
compute each row's loss and its gradient in one pass over the logits (math in
csrc/softmax_kl_math.h). The gradient is saved in forward and scaled by the incoming
gradient in backward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _verify
from .._dtypes import acc_dtype
from ._op import Kernels, fused_op, needs_grad
from ._reduction import reduce_rows, reduction_divisor
from ._saved_grad import scale_saved_grad


def soft_target_kl_ref(s: torch.Tensor, t: torch.Tensor, T: float = 1.0, dim: int = -1) -> torch.Tensor:
    """Per-row ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` over ``dim`` (rows: the shape without dim).

    Classes the teacher gives probability 0 (e.g. -inf logits) add 0, as in the KL's
    definition. Computed in float32 (float64 for float64 inputs).
    """
    acc = acc_dtype(s.dtype)
    log_p = F.log_softmax(s.to(acc) / T, dim)
    log_q = F.log_softmax(t.to(acc) / T, dim)
    q = log_q.exp()
    return (T * T) * torch.where(q > 0, q * (log_q - log_p), 0).sum(dim)


def decoupled_kd_ref(s: torch.Tensor, t: torch.Tensor, target: torch.Tensor, T: float = 4.0,
                     alpha: float = 1.0, beta: float = 8.0, normalize: bool = False,
                     dim: int = -1) -> torch.Tensor:
    """Per-row Decoupled KD (Zhao et al. 2022), exactly as fasterai 0.4.1 computes it.

    TCKD: KL of the binary [target, rest] distributions (student clamped at 1e-7);
    NCKD: KL over the non-target classes, masking the target by -1000 (normalize=False) or
    dropping it (normalize=True; the two agree unless logits differ by ~1000·T);
    row loss ``T² (alpha TCKD + beta NCKD)``.
    """
    acc = acc_dtype(s.dtype)
    s, t = s.to(acc).movedim(dim, -1), t.to(acc).movedim(dim, -1)
    C = s.shape[-1]
    gt = F.one_hot(target, C).bool()
    p_s, p_t = F.softmax(s / T, -1), F.softmax(t / T, -1)
    ps_g = p_s.gather(-1, target.unsqueeze(-1))
    pt_g = p_t.gather(-1, target.unsqueeze(-1))
    b_s = torch.cat([ps_g, 1 - ps_g], -1)
    b_t = torch.cat([pt_g, 1 - pt_g], -1)
    tckd = F.kl_div(b_s.clamp(min=1e-7).log(), b_t, reduction="none").sum(-1)
    if normalize:
        rows_shape = s.shape[:-1] + (C - 1,)
        s_nt, t_nt = (s / T)[~gt].view(rows_shape), (t / T)[~gt].view(rows_shape)
        nckd = F.kl_div(F.log_softmax(s_nt, -1), F.softmax(t_nt, -1), reduction="none").sum(-1)
    else:
        shift = gt.to(acc) * 1000.0
        nckd = F.kl_div(F.log_softmax(s / T - shift, -1), F.softmax(t / T - shift, -1), reduction="none").sum(-1)
    return (T * T) * (alpha * tckd + beta * nckd)


def softmax_kl_ref(s, t, target, dim, T, ignore_index, decoupled, alpha, beta, normalize, reduction):
    """The whole op in plain PyTorch (the torch backend): rows, ignored rows, reduction."""
    kept = None
    if target is not None:
        kept = target != ignore_index
        # Ignored rows get harmless stand-ins so that they add exactly 0, NaN input included.
        s = s.masked_fill(~kept.unsqueeze(dim), 0)
        t = t.masked_fill(~kept.unsqueeze(dim), 0)
        target = target.masked_fill(~kept, 0)
    if decoupled:
        rows = decoupled_kd_ref(s, t, target, T, alpha, beta, normalize, dim)
    else:
        rows = soft_target_kl_ref(s, t, T, dim)
    if kept is not None:
        rows = rows.masked_fill(~kept, 0)
    return reduce_rows(rows, reduction, s.shape[0], kept)


# The fused kernels: torch.ops.kdfast_C.softmax_kl (cpu, cuda), softmax_kl_triton (triton).
KERNELS = Kernels("softmax_kl", triton={"softmax_kl": "softmax_kl_triton"})


@fused_op("kdfast::softmax_kl", grads=("s",))
def softmax_kl(s: torch.Tensor, t: torch.Tensor, target: torch.Tensor | None, dim: int, T: float,
               ignore_index: int, decoupled: bool, alpha: float, beta: float, reduction: str,
               compute_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused softmax-KL: (reduced loss, its gradient w.r.t. s or an empty tensor).

    ``dim`` must be non-negative, s and t of one dtype; backend in cpu / cuda / triton.
    """
    kept = None if target is None else target != ignore_index
    divisor = reduction_divisor(reduction, s.shape[0], s.numel() // s.shape[dim], kept)
    if isinstance(divisor, int):  # a fill, not a host-to-device copy
        scale = torch.full((), 1.0 / divisor, dtype=torch.float64, device=s.device)
    else:
        scale = divisor.to(torch.float64).reciprocal()
    rows, grad = KERNELS("softmax_kl", backend)(s, t, target, scale, dim, T, ignore_index, alpha, beta, decoupled,
                                                compute_grad)
    if compute_grad and grad.stride() != s.stride() and grad.stride() != torch.empty_like(s).stride():
        grad = torch.empty_like(s).copy_(grad)  # the layout the fake kernel promises
    if reduction == "none":
        return rows, grad
    return (rows.sum() * scale).to(rows.dtype), grad


@softmax_kl.register_fake
def _(s, t, target, dim, T, ignore_index, decoupled, alpha, beta, reduction, compute_grad, backend):
    rows_shape = s.shape[:dim] + s.shape[dim + 1:]
    loss = s.new_empty(rows_shape if reduction == "none" else (), dtype=acc_dtype(s.dtype))
    grad = torch.empty_like(s) if compute_grad else s.new_empty(0)
    return loss, grad


def _setup_context(ctx, inputs, output):
    ctx.dim, ctx.reduction = inputs.dim, inputs.reduction
    # The gradient is saved, not an output to differentiate: autograd would otherwise hand
    # backward a zero-filled tensor of s's size for it (a full extra write of the logits).
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss):
    (grad,) = ctx.saved_tensors
    grad_loss = grad_loss.unsqueeze(ctx.dim) if ctx.reduction == "none" else grad_loss
    return scale_saved_grad(grad, grad_loss)


softmax_kl.register_autograd(_backward, setup_context=_setup_context)


def softmax_kl_loss(s, t, *, T, reduction, dim, target=None, ignore_index=-100,
                    decoupled=False, alpha=1.0, beta=8.0, normalize=False, op="soft_target_kl"):
    """Run the op on the chosen backend. Inputs are validated by kdfast.functional."""
    t = t.detach()
    if s.dtype != t.dtype:
        common = torch.promote_types(s.dtype, t.dtype)
        s, t = s.to(common), t.to(common)
    dim = dim % s.dim()
    kw = dict(T=T, reduction=reduction, ignore_index=ignore_index, decoupled=decoupled, alpha=alpha, beta=beta,
              normalize=normalize, op=op)
    backend = KERNELS.backend(op, s.device, _verify.first_use("softmax_kl", op, s.device, s.dtype,
                                                              lambda b: kernel_path(b, s, t, dim),
                                                              lambda: _slice(s, t, target, dim, kw)))
    if backend == "torch":
        return softmax_kl_ref(s, t, target, dim, T, ignore_index, decoupled, alpha, beta, normalize, reduction)
    loss, _ = softmax_kl(s, t, target, dim, float(T), int(ignore_index), decoupled, float(alpha), float(beta),
                         reduction, needs_grad(s), backend)
    return loss


_CUDA_PATHS: dict[tuple, str] = {}


def kernel_path(backend: str, s: torch.Tensor, t: torch.Tensor, dim: int) -> str:
    """The kernel path a call takes on a GPU backend (the key of verified first use)."""
    if backend == "triton":
        from ..triton.softmax_kl import kernel_path as triton_path
        return triton_path(s, dim)
    key = (s.shape, s.stride(), t.stride(), s.dtype, s.device, dim, s.data_ptr() % 16, t.data_ptr() % 16)
    path = _CUDA_PATHS.get(key)
    if path is None:
        if len(_CUDA_PATHS) > 4096:
            _CUDA_PATHS.clear()
        path = _CUDA_PATHS[key] = torch.ops.kdfast_C.softmax_kl_path(s, t, dim, True)
    return path


def _slice(s, t, target, dim, kw) -> _verify.Slice:
    """The call on at most ROWS x ROWS rows of the logits seen as [A, V, I] (the class dim
    and its layout kept), for verified first use."""
    A, V, I = math.prod(s.shape[:dim]), s.shape[dim], math.prod(s.shape[dim + 1:])
    k = _verify.ROWS
    inputs = [s.reshape(A, V, I)[:k, :, :k], t.reshape(A, V, I)[:k, :, :k]]
    if target is not None:
        inputs.append(target.reshape(A, I)[:k, :k])
    return _verify.Slice(lambda s, t, target=None: softmax_kl_loss(s, t, target=target, dim=1, **kw), inputs, 1)
