"""Temperature-softmax divergences: SoftTarget, Mutual, DecoupledKD and the LLM losses
(reverse KL, generalized JSD, TVD), dense or against a sparse (top-k) teacher, behind two
fused ops.

The ``*_ref`` functions are the definitions (and the torch backend): ``soft_target_kl_ref``,
``reverse_kl_ref``, ``jsd_ref``, ``tvd_ref``, ``decoupled_kd_ref`` and, for top-k teachers,
``topk_logprobs_ref`` (the two distributions a TopK teacher defines). ``kdfast::softmax_kl``
and ``kdfast::softmax_kl_topk`` run the fused kernels (C++ CPU, Triton, CUDA), which compute
each row's loss and its gradient in the forward pass (math in csrc/softmax_kl_math.h); the
gradient is saved and scaled by the incoming gradient in backward.

Notation: s, t student and teacher logits; ls = log_softmax(s/T), lt = log_softmax(t/T)
(student and teacher log-probabilities), ps = exp(ls), pt = exp(lt).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _checks, _verify
from .._dtypes import acc_dtype
from ._op import Kernels, fused_op, needs_grad
from ._reduction import reduce_rows, reduction_divisor
from ._saved_grad import scale_saved_grad

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
TAILS = ("bucket", "renormalize")


def divergence_scale(divergence: str, T: float) -> float:
    """What a divergence is multiplied by at temperature T: T² for the KLs and JSD (Hinton:
    gradients of the same size whatever T), T for TVD (bounded by 1, it shrinks like 1/T as T
    grows, and so does its gradient; times T both stay of order 1)."""
    return T if divergence == "tvd" else T * T


def _p_log_ratio(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Per class ``p (log p - log q)``, 0 where p = 0 (the KL's convention 0 log 0 = 0), with
    a zero gradient there even when log q is -inf too."""
    p = lp.exp()
    keep = p > 0
    return torch.where(keep, p * (torch.where(keep, lp, 0) - torch.where(keep, lq, 0)), 0)


def jsd_log_mixture(ls: torch.Tensor, lt: torch.Tensor, beta: float) -> torch.Tensor:
    """``log m``, ``m = beta pt + (1 - beta) ps``: a logsumexp of ``log beta + lt`` and
    ``log(1 - beta) + ls`` (0 < beta < 1); where both are -inf (m = 0) a finite stand-in, so
    that the terms there (which are 0) get a zero gradient."""
    both_zero = (ls == float("-inf")) & (lt == float("-inf"))
    return torch.logsumexp(torch.stack([torch.where(both_zero, 0, lt) + math.log(beta),
                                        torch.where(both_zero, 0, ls) + math.log1p(-beta)]), 0)


def divergence_elements(ls: torch.Tensor, lt: torch.Tensor, divergence: str, beta: float = 0.5) -> torch.Tensor:
    """Per class, the terms whose sum over the classes is the divergence of the student's
    distribution (log-probabilities ls) from the teacher's (lt), no temperature scaling:

    forward_kl  KL(pt ‖ ps) = sum pt (lt - ls)
    reverse_kl  KL(ps ‖ pt) = sum ps (ls - lt)
    jsd         beta KL(pt ‖ m) + (1 - beta) KL(ps ‖ m),  m = beta pt + (1 - beta) ps
                (GKD; TRL's definition: beta = 0 is forward KL and beta = 1 reverse KL
                exactly, while inside (0, 1) JSD ≈ beta·KL(pt ‖ ps) near 0 and
                ≈ (1 - beta)·KL(ps ‖ pt) near 1: the value jumps at both ends, TRL #6780)
    tvd         ½ sum |ps - pt|

    A class of probability 0 adds 0 to a KL weighted by it (0 log 0 = 0)."""
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return _p_log_ratio(lt, ls)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return _p_log_ratio(ls, lt)
    if divergence == "jsd":
        lm = jsd_log_mixture(ls, lt, beta)
        return beta * _p_log_ratio(lt, lm) + (1 - beta) * _p_log_ratio(ls, lm)
    if divergence == "tvd":
        return 0.5 * (ls.exp() - lt.exp()).abs()
    raise ValueError(f"unknown divergence {divergence!r}; one of {', '.join(DIVERGENCES)}")


def divergence_logprobs(ls: torch.Tensor, lt: torch.Tensor, divergence: str, beta: float = 0.5,
                        dim: int = -1) -> torch.Tensor:
    """The divergence per row: divergence_elements summed over the class dim ``dim``."""
    return divergence_elements(ls, lt, divergence, beta).sum(dim)


def softmax_divergence_ref(s: torch.Tensor, t: torch.Tensor, divergence: str = "forward_kl", beta: float = 0.5,
                           T: float = 1.0, dim: int = -1) -> torch.Tensor:
    """Per row (the shape without ``dim``): ``divergence_scale · D(softmax(s/T), softmax(t/T))``,
    computed in float32 (float64 for float64 inputs)."""
    acc = acc_dtype(s.dtype, t.dtype)
    ls = F.log_softmax(s.to(acc) / T, dim)
    lt = F.log_softmax(t.to(acc) / T, dim)
    return divergence_scale(divergence, T) * divergence_logprobs(ls, lt, divergence, beta, dim)


def soft_target_kl_ref(s: torch.Tensor, t: torch.Tensor, T: float = 1.0, dim: int = -1) -> torch.Tensor:
    """Per-row ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` over ``dim`` (rows: the shape without dim).

    Classes the teacher gives probability 0 (e.g. -inf logits) add 0, as in the KL's
    definition. Computed in float32 (float64 for float64 inputs).
    """
    return softmax_divergence_ref(s, t, "forward_kl", T=T, dim=dim)


def reverse_kl_ref(s: torch.Tensor, t: torch.Tensor, T: float = 1.0, dim: int = -1) -> torch.Tensor:
    """Per-row ``T² · KL(softmax(s/T) ‖ softmax(t/T))``: the student's distribution first
    (mode-seeking; TRL's DistillationTrainer default, MiniLLM)."""
    return softmax_divergence_ref(s, t, "reverse_kl", T=T, dim=dim)


def jsd_ref(s: torch.Tensor, t: torch.Tensor, beta: float = 0.5, T: float = 1.0, dim: int = -1) -> torch.Tensor:
    """Per-row ``T² · JSD_beta`` (see divergence_elements; beta = 0 forward KL, 1 reverse KL)."""
    return softmax_divergence_ref(s, t, "jsd", beta, T, dim)


def tvd_ref(s: torch.Tensor, t: torch.Tensor, T: float = 1.0, dim: int = -1) -> torch.Tensor:
    """Per-row ``T · ½ sum |softmax(s/T) - softmax(t/T)|`` (T = 1: the plain total variation)."""
    return softmax_divergence_ref(s, t, "tvd", T=T, dim=dim)


def topk_bad_rows(indices: torch.Tensor, V: int) -> torch.Tensor:
    """Rows (class dim last) whose indices leave [0, V) or repeat a class."""
    out_of_range = ((indices < 0) | (indices >= V)).any(-1)
    ordered = indices.sort(-1).values
    return out_of_range | (ordered[..., 1:] == ordered[..., :-1]).any(-1)


def topk_logprobs_ref(s: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor, T: float = 1.0,
                      tail: str = "bucket") -> tuple[torch.Tensor, torch.Tensor]:
    """The student's and the teacher's log-probabilities over the classes a TopK teacher
    defines (class dim last everywhere): s [..., V], indices and logprobs [..., k].

    bucket (T = 1): the k classes K and, when k < V, one tail class holding the rest:
    the teacher's ``p_tail = max(0, 1 - sum_K p)`` (stored probabilities rounded to bfloat16
    can sum past 1: the tail is then empty), the student's ``log q_tail =
    logsumexp_{j not in K} log q_j`` from its full-vocabulary softmax. renormalize: both
    restricted to K, ``softmax(s_K / T)`` and ``softmax(logprobs / T)`` (re-tempering the
    stored log-probabilities is exact over K).
    """
    acc = acc_dtype(s.dtype)
    s, idx, lp = s.to(acc), indices.long(), logprobs.to(acc)
    if tail == "renormalize":
        return F.log_softmax(s.gather(-1, idx) / T, -1), F.log_softmax(lp / T, -1)
    ls_full = F.log_softmax(s / T, -1)
    ls = ls_full.gather(-1, idx)
    if idx.shape[-1] == s.shape[-1]:  # no class outside K: no tail
        return ls, lp
    outside = torch.ones_like(ls_full, dtype=torch.bool).scatter(-1, idx, False)
    # logsumexp over the classes outside K, with a zero gradient (not NaN) where they are all -inf
    rest = ls_full.masked_fill(~outside, float("-inf"))
    m = rest.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, 0)
    total = (rest - m).exp().sum(-1, keepdim=True)
    ls_tail = torch.where(total > 0, m + torch.where(total > 0, total, 1).log(), float("-inf"))
    p_tail = (1 - lp.exp().sum(-1, keepdim=True)).clamp_min(0)
    return torch.cat([ls, ls_tail], -1), torch.cat([lp, p_tail.log()], -1)


def topk_divergence_ref(s: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor,
                        divergence: str = "forward_kl", beta: float = 0.5, T: float = 1.0, tail: str = "bucket",
                        dim: int = -1) -> torch.Tensor:
    """Per row: ``divergence_scale · D`` between the distributions of topk_logprobs_ref.
    Rows whose indices leave [0, V) or repeat a class get NaN."""
    s, indices, logprobs = s.movedim(dim, -1), indices.movedim(dim, -1), logprobs.movedim(dim, -1)
    bad = topk_bad_rows(indices, s.shape[-1])
    indices = torch.where(bad.unsqueeze(-1), torch.arange(indices.shape[-1], device=indices.device), indices)
    ls, lt = topk_logprobs_ref(s, indices, logprobs, T, tail)
    rows = divergence_scale(divergence, T) * divergence_logprobs(ls, lt, divergence, beta, -1)
    return rows.masked_fill(bad, float("nan"))


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
    # F.kl_div's terms (fasterai's), with 0 log 0 = 0 also where both sides are -inf (a
    # class of probability 0 for both: fasterai's kl_div gives 0 · (-inf - -inf) = NaN there)
    tckd = _p_log_ratio(b_t.log(), b_s.clamp(min=1e-7).log()).sum(-1)
    if normalize:
        rows_shape = s.shape[:-1] + (C - 1,)
        s_nt, t_nt = (s / T)[~gt].view(rows_shape), (t / T)[~gt].view(rows_shape)
        nckd = _p_log_ratio(F.log_softmax(t_nt, -1), F.log_softmax(s_nt, -1)).sum(-1)
    else:
        shift = gt.to(acc) * 1000.0
        nckd = _p_log_ratio(F.log_softmax(t / T - shift, -1), F.log_softmax(s / T - shift, -1)).sum(-1)
    # a row without a softmax (all -inf, or +inf, NaN) is NaN, which 0 log 0 = 0 would hide
    no_softmax = (p_s.isnan() | p_t.isnan()).any(-1)
    return ((T * T) * (alpha * tckd + beta * nckd)).masked_fill(no_softmax, float("nan"))


def _reduce(rows: torch.Tensor, reduction: str, batch_size: int, kept: torch.Tensor | None, weight: float,
            divisor: torch.Tensor | None) -> torch.Tensor:
    """``weight ·`` the reduction of row losses; ``divisor`` (e.g. TRL's num_items_in_batch)
    replaces the reduction's own when given."""
    if reduction == "none":
        return rows * weight if weight != 1 else rows
    if divisor is None:
        loss = reduce_rows(rows, reduction, batch_size, kept)
    else:
        loss = rows.sum() / divisor.to(rows.device, rows.dtype)
    return loss * weight if weight != 1 else loss


def softmax_kl_ref(s, t, target, dim, T, ignore_index, decoupled, alpha, beta, normalize, reduction,
                   divergence="forward_kl", jsd_beta=0.5, weight=1.0, divisor=None):
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
        rows = softmax_divergence_ref(s, t, divergence, jsd_beta, T, dim)
    if kept is not None:
        rows = rows.masked_fill(~kept, 0)
    return _reduce(rows, reduction, s.shape[0], kept, weight, divisor)


def softmax_kl_topk_ref(s, indices, logprobs, target, dim, T, ignore_index, divergence, jsd_beta, tail, reduction,
                        weight=1.0, divisor=None):
    """The sparse-teacher op in plain PyTorch (the torch backend)."""
    kept = None
    if target is not None:
        kept = target != ignore_index
        k = indices.shape[dim]
        s = s.masked_fill(~kept.unsqueeze(dim), 0)
        stand_in = torch.arange(k, device=indices.device).view([k if d == dim else 1 for d in range(indices.dim())])
        indices = torch.where(kept.unsqueeze(dim), indices, stand_in)
        logprobs = logprobs.masked_fill(~kept.unsqueeze(dim), -math.log(s.shape[dim]))
    rows = topk_divergence_ref(s, indices, logprobs, divergence, jsd_beta, T, tail, dim)
    if kept is not None:
        rows = rows.masked_fill(~kept, 0)
    return _reduce(rows, reduction, s.shape[0], kept, weight, divisor)


def _grad_scale(reduction: str, s: torch.Tensor, dim: int, kept: torch.Tensor | None, weight: float,
                divisor: torch.Tensor | None) -> torch.Tensor:
    """d(loss)/d(row loss) as a 0-dim float64 tensor on s's device (the kernels' ``scale``)."""
    if divisor is None:
        divisor = reduction_divisor(reduction, s.shape[0], s.numel() // s.shape[dim], kept)
    if isinstance(divisor, int):  # a fill, not a host-to-device copy
        return torch.full((), weight / divisor, dtype=torch.float64, device=s.device)
    return divisor.to(s.device, torch.float64).reciprocal() * weight


def _finish(rows: torch.Tensor, scale: torch.Tensor, reduction: str, weight: float) -> torch.Tensor:
    if reduction == "none":
        return rows * weight if weight != 1 else rows
    return (rows.sum() * scale).to(rows.dtype)


# The fused kernels: torch.ops.kdfast_C.softmax_kl and softmax_kl_topk (cpu, cuda),
# softmax_kl_triton and softmax_kl_topk_triton (triton).
KERNELS = Kernels("softmax_kl", triton={"softmax_kl": "softmax_kl_triton", "softmax_kl_topk": "softmax_kl_topk_triton"})


@fused_op("kdfast::softmax_kl", grads=("s",))
def softmax_kl(s: torch.Tensor, t: torch.Tensor, target: torch.Tensor | None, dim: int, T: float,
               ignore_index: int, divergence: str, jsd_beta: float, decoupled: bool, alpha: float, beta: float,
               reduction: str, weight: float, divisor: torch.Tensor | None, compute_grad: bool,
               backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused softmax divergence: (reduced loss, its gradient w.r.t. s or an empty tensor).

    ``dim`` must be non-negative, s and t of one dtype; backend in cpu / cuda / triton.
    ``weight`` multiplies the loss; ``divisor``, when given, replaces the reduction's.
    """
    kept = None if target is None else target != ignore_index
    scale = _grad_scale(reduction, s, dim, kept, weight, divisor)
    rows, grad = KERNELS("softmax_kl", backend)(s, t, target, scale, dim, T, ignore_index, alpha, beta, decoupled,
                                                compute_grad, divergence, jsd_beta)
    if compute_grad and grad.stride() != s.stride() and grad.stride() != torch.empty_like(s).stride():
        grad = torch.empty_like(s).copy_(grad)  # the layout the fake kernel promises
    return _finish(rows, scale, reduction, weight), grad


@softmax_kl.register_fake
def _(s, t, target, dim, T, ignore_index, divergence, jsd_beta, decoupled, alpha, beta, reduction, weight, divisor,
      compute_grad, backend):
    rows_shape = s.shape[:dim] + s.shape[dim + 1:]
    loss = s.new_empty(rows_shape if reduction == "none" else (), dtype=acc_dtype(s.dtype))
    grad = torch.empty_like(s) if compute_grad else s.new_empty(0)
    return loss, grad


@fused_op("kdfast::softmax_kl_topk", grads=("s",))
def softmax_kl_topk(s: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor, target: torch.Tensor | None,
                    dim: int, T: float, ignore_index: int, divergence: str, jsd_beta: float, renormalize: bool,
                    reduction: str, weight: float, divisor: torch.Tensor | None, compute_grad: bool,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused divergence against a sparse teacher: (reduced loss, gradient w.r.t. s or empty).

    s [.., V, ..] with the class dim ``dim`` (non-negative); indices and logprobs shaped
    like s with that dim of size k. The kernels take the class dim last: int64 indices and
    log-probabilities in the accumulation dtype, [rows, k] contiguous (O(rows·k) copies).
    """
    kept = None if target is None else target != ignore_index
    scale = _grad_scale(reduction, s, dim, kept, weight, divisor)
    acc = acc_dtype(s.dtype)
    s_last = s.movedim(dim, -1)
    indices = indices.movedim(dim, -1).to(torch.int64).contiguous()
    logprobs = logprobs.movedim(dim, -1).to(acc).contiguous()
    rows, grad = KERNELS("softmax_kl_topk", backend)(s_last, indices, logprobs, target, scale, T, ignore_index,
                                                     divergence, jsd_beta, renormalize, compute_grad)
    if compute_grad:
        grad = grad.movedim(-1, dim)
        if grad.stride() != s.stride() and grad.stride() != torch.empty_like(s).stride():
            grad = torch.empty_like(s).copy_(grad)  # the layout the fake kernel promises
    return _finish(rows, scale, reduction, weight), grad


@softmax_kl_topk.register_fake
def _(s, indices, logprobs, target, dim, T, ignore_index, divergence, jsd_beta, renormalize, reduction, weight,
      divisor, compute_grad, backend):
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
softmax_kl_topk.register_autograd(_backward, setup_context=_setup_context)


def _divisor_tensor(divisor, device):
    if divisor is None or isinstance(divisor, torch.Tensor):
        return divisor
    return torch.tensor(float(divisor), dtype=torch.float64, device=device)


def softmax_kl_loss(s, t, *, T, reduction, dim, target=None, ignore_index=-100, divergence="forward_kl",
                    jsd_beta=0.5, decoupled=False, alpha=1.0, beta=8.0, normalize=False, weight=1.0, divisor=None,
                    op="soft_target_kl"):
    """Run the op on the chosen backend. Inputs are validated by kdfast.functional."""
    t = t.detach()
    if s.dtype != t.dtype:
        common = torch.promote_types(s.dtype, t.dtype)
        s, t = s.to(common), t.to(common)
    dim = dim % s.dim()
    divisor = _divisor_tensor(divisor, s.device)
    kw = dict(T=T, reduction=reduction, ignore_index=ignore_index, divergence=divergence, jsd_beta=jsd_beta,
              decoupled=decoupled, alpha=alpha, beta=beta, normalize=normalize, weight=weight, divisor=divisor, op=op)
    backend = KERNELS.backend(op, s.device, _verify.first_use("softmax_kl", op, s.device, s.dtype,
                                                              lambda b: kernel_path(b, s, t, dim),
                                                              lambda: _slice(s, t, target, dim, kw)))
    if backend == "torch":
        return softmax_kl_ref(s, t, target, dim, T, ignore_index, decoupled, alpha, beta, normalize, reduction,
                              divergence, jsd_beta, weight, divisor)
    loss, _ = softmax_kl(s, t, target, dim, float(T), int(ignore_index), divergence, float(jsd_beta), decoupled,
                         float(alpha), float(beta), reduction, float(weight), divisor, needs_grad(s), backend)
    return loss


def softmax_kl_topk_loss(s, indices, logprobs, *, T, reduction, dim, target=None, ignore_index=-100,
                         divergence="forward_kl", jsd_beta=0.5, tail="bucket", weight=1.0, divisor=None,
                         op="soft_target_kl"):
    """Run the sparse-teacher op on the chosen backend (inputs validated by kdfast.functional)."""
    indices, logprobs = indices.detach(), logprobs.detach()
    dim = dim % s.dim()
    divisor = _divisor_tensor(divisor, s.device)
    kw = dict(T=T, reduction=reduction, ignore_index=ignore_index, divergence=divergence, jsd_beta=jsd_beta,
              tail=tail, weight=weight, divisor=divisor, op=op)
    backend = KERNELS.backend(op, s.device, _verify.first_use("softmax_kl", op, s.device, s.dtype,
                                                                   lambda b: topk_kernel_path(b, tail),
                                                                   lambda: _topk_slice(s, indices, logprobs, target,
                                                                                       dim, kw)))
    if backend == "torch":
        try:
            _checks.check_topk_indices(indices, s.shape[dim], dim)
        except ValueError as e:
            raise ValueError(f"{op}: {e}") from None
        return softmax_kl_topk_ref(s, indices, logprobs, target, dim, T, ignore_index, divergence, jsd_beta, tail,
                                   reduction, weight, divisor)
    try:
        loss, _ = softmax_kl_topk(s, indices, logprobs, target, dim, float(T), int(ignore_index), divergence,
                                  float(jsd_beta), tail == "renormalize", reduction, float(weight), divisor,
                                  needs_grad(s), backend)
    except ValueError as e:  # the CPU kernel's checks of the indices (check_topk_indices' errors)
        raise ValueError(f"{op}: {e}") from None
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


def topk_kernel_path(backend: str, tail: str) -> str:
    """The kernel path of a sparse-teacher call (the key of verified first use)."""
    return f"topk-{tail}"


def _topk_slice(s, indices, logprobs, target, dim, kw) -> _verify.Slice:
    """The sparse-teacher call on at most ROWS x ROWS rows, for verified first use."""
    A, V, I = math.prod(s.shape[:dim]), s.shape[dim], math.prod(s.shape[dim + 1:])
    k, r = indices.shape[dim], _verify.ROWS
    inputs = [s.reshape(A, V, I)[:r, :, :r], indices.reshape(A, k, I)[:r, :, :r], logprobs.reshape(A, k, I)[:r, :, :r]]
    if target is not None:
        inputs.append(target.reshape(A, I)[:r, :r])

    def call(s, indices, logprobs, target=None):
        return softmax_kl_topk_loss(s, indices, logprobs, target=target, dim=1, **kw)
    return _verify.Slice(call, inputs, 1)
