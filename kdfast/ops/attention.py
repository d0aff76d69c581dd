"""Attention transfer (Zagoruyko & Komodakis 2017), fasterai's formulation.

``attention_map_ref`` / ``attention_transfer_ref`` are the definitions and the torch backend.
``kdfast::attention_transfer`` runs the fused kernels (C++ CPU, Triton, CUDA) on all layer
pairs of a step at once: its forward reads every feature map once and keeps, per pair, the
[B, H·W] map ``w = d loss / d mean_c f_s^p``; its backward (``kdfast::attention_transfer_backward``)
reads each student map once and writes its gradient once, scaled by the incoming gradient.
Math and derivation: csrc/attention_math.h.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _verify
from .._backend import select_backend
from ._common import acc_dtype, traced

KERNELS = ("torch", "cpu", "triton", "cuda")


def attention_map_ref(f: torch.Tensor, p: float = 2) -> torch.Tensor:
    """``normalize(mean_c f^p)`` over the spatial positions: [B, C, *S] -> [B, prod(S)]."""
    a = f.to(acc_dtype(f.dtype)).pow(p).mean(1).flatten(1)
    return F.normalize(a, dim=1)


def attention_transfer_ref(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Mean over batch and positions of ``(a(f_s) - a(f_t))²``; channel counts may differ."""
    return F.mse_loss(attention_map_ref(f_s, p), attention_map_ref(f_t.detach(), p))


def pool_to_match(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive average pooling of the larger spatial map to the smaller one's size, per
    spatial dim (RepDistiller's convention for attention transfer between resolutions)."""
    size = tuple(min(a, b) for a, b in zip(f_s.shape[2:], f_t.shape[2:]))
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(size)]
    if tuple(f_s.shape[2:]) != size:
        f_s = pool(f_s, size)
    if tuple(f_t.shape[2:]) != size:
        f_t = pool(f_t, size)
    return f_s, f_t


def _forward_kernels(f_s, f_t, p, backend):
    if backend == "triton":
        from ..triton.attention import attention_transfer_forward_triton
        return attention_transfer_forward_triton(f_s, f_t, p)
    return torch.ops.kdfast_C.attention_transfer_forward(f_s, f_t, p)


def _backward_kernels(grad_loss, f_s, maps, p, backend):
    if backend == "triton":
        from ..triton.attention import attention_transfer_backward_triton
        return attention_transfer_backward_triton(grad_loss, f_s, maps, p)
    return torch.ops.kdfast_C.attention_transfer_backward(grad_loss, f_s, maps, p)


@torch.library.custom_op("kdfast::attention_transfer", mutates_args=())
def attention_transfer_fused(f_s: list[torch.Tensor], f_t: list[torch.Tensor], p: float,
                             backend: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Fused attention transfer over layer pairs: (loss summed over the pairs, per pair the
    [B, X] map w that backward needs). All maps share one dtype and device; backend in
    cpu / cuda / triton."""
    return _forward_kernels(f_s, f_t, p, backend)


@attention_transfer_fused.register_fake
def _(f_s, f_t, p, backend):
    acc = acc_dtype(f_s[0].dtype)
    return (f_s[0].new_empty((), dtype=acc),
            [f.new_empty((f.shape[0], math.prod(f.shape[2:])), dtype=acc) for f in f_s])


@torch.library.custom_op("kdfast::attention_transfer_backward", mutates_args=())
def attention_transfer_backward(grad_loss: torch.Tensor, f_s: list[torch.Tensor], maps: list[torch.Tensor],
                                p: float, backend: str) -> list[torch.Tensor]:
    """grad_loss · d loss / d f_s for every student map (layout: empty_like(f_s))."""
    return _backward_kernels(grad_loss, f_s, maps, p, backend)


@attention_transfer_backward.register_fake
def _(grad_loss, f_s, maps, p, backend):
    return [torch.empty_like(f) for f in f_s]


def _setup_context(ctx, inputs, output):
    f_s, f_t, p, backend = inputs
    ctx.p, ctx.backend, ctx.pairs = p, backend, len(f_s)
    ctx.set_materialize_grads(False)  # the maps are saved for backward, not differentiated
    ctx.save_for_backward(*f_s, *output[1])


def _backward(ctx, grad_loss, grad_maps):
    if grad_loss is None:  # grads are not materialised: no gradient reached the loss
        return [None] * ctx.pairs, [None] * ctx.pairs, None, None
    saved = ctx.saved_tensors
    f_s, maps = list(saved[:ctx.pairs]), list(saved[ctx.pairs:])
    grads = attention_transfer_backward(grad_loss, f_s, maps, ctx.p, ctx.backend)
    return grads, [None] * ctx.pairs, None, None


attention_transfer_fused.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttentionTransfer(torch.autograd.Function):
    """The same kernels and autograd as the custom op, for eager calls.

    The custom op's autograd wrapper flattens its list arguments on every call, which costs
    more (~0.3 ms a step on a CPU core) than the kernels themselves at small sizes; eager
    calls take this direct path, torch.compile traces the custom op.
    """

    @staticmethod
    def forward(ctx, p, backend, pairs, *maps):
        f_s, f_t = list(maps[:pairs]), list(maps[pairs:])
        loss, w = _forward_kernels(f_s, f_t, p, backend)
        ctx.p, ctx.backend, ctx.pairs = p, backend, pairs
        ctx.save_for_backward(*f_s, *w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = ctx.saved_tensors
        grads = _backward_kernels(grad_loss, list(saved[:ctx.pairs]), list(saved[ctx.pairs:]), ctx.p, ctx.backend)
        return (None, None, None, *grads) + (None,) * ctx.pairs


def attention_transfer_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]], p: float,
                             op: str = "attention_transfer") -> torch.Tensor:
    """Sum over layer pairs of the attention-transfer loss, on the chosen backend.

    Pairs are validated (and pooled) by kdfast.functional. Teachers are detached; a pair
    whose dtypes differ is promoted to the common dtype. Pairs sharing device and dtype
    (usually all of them) go to the fused op in one call.
    """
    groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for f_s, f_t in pairs:
        f_t = f_t.detach()
        if f_s.dtype != f_t.dtype:
            common = torch.promote_types(f_s.dtype, f_t.dtype)
            f_s, f_t = f_s.to(common), f_t.to(common)
        groups.setdefault((f_s.device, f_s.dtype), []).append((f_s, f_t))
    total = None
    for (device, dtype), group in groups.items():
        backend = select_backend(op, KERNELS, device, _verify.first_use(
            "attention", op, device, dtype, lambda b: kernel_path(b, group, p), lambda: _slice(group, p, op)))
        if backend == "torch":
            loss = sum(attention_transfer_ref(f_s, f_t, p) for f_s, f_t in group)
        elif traced([x for pair in group for x in pair]):
            loss, _ = attention_transfer_fused([s for s, _ in group], [t for _, t in group], float(p), backend)
        else:
            loss = _EagerAttentionTransfer.apply(float(p), backend, len(group), *(s for s, _ in group),
                                                 *(t for _, t in group))
        total = loss if total is None else total + loss
    return total


_CUDA_PATHS: dict[tuple, str] = {}


def kernel_path(backend: str, pairs: list[tuple[torch.Tensor, torch.Tensor]], p: float) -> str:
    """The kernel path a call takes on a GPU backend (the key of verified first use)."""
    f_s, f_t = [s for s, _ in pairs], [t for _, t in pairs]
    if backend == "triton":
        from ..triton.attention import kernel_path as triton_path
        return triton_path(f_s, f_t, p)
    key = (float(p), *((f.shape, f.stride(), f.data_ptr() % 16) for f in (*f_s, *f_t)))
    path = _CUDA_PATHS.get(key)
    if path is None:
        if len(_CUDA_PATHS) > 4096:
            _CUDA_PATHS.clear()
        path = _CUDA_PATHS[key] = torch.ops.kdfast_C.attention_path(f_s, f_t, float(p))
    return path


def _slice(pairs: list[tuple[torch.Tensor, torch.Tensor]], p: float, op: str) -> _verify.Slice:
    """The call on the first samples of every pair (channels, positions and layouts kept),
    for verified first use."""
    n, k = len(pairs), _verify.SAMPLES
    inputs = [s[:k] for s, _ in pairs] + [t[:k] for _, t in pairs]
    return _verify.Slice(lambda *maps: attention_transfer_pairs(list(zip(maps[:n], maps[n:])), p, op), inputs, n)
