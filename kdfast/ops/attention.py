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
from .._dtypes import acc_dtype
from ._op import Kernels, fused_op


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


# The fused kernels (cpu, cuda: torch.ops.kdfast_C; triton: kdfast/triton/attention.py).
KERNELS = Kernels("attention", triton={"attention_transfer_forward": "attention_transfer_forward_triton",
                                       "attention_transfer_backward": "attention_transfer_backward_triton"})


@fused_op("kdfast::attention_transfer", grads=("f_s",))
def attention_transfer(f_s: list[torch.Tensor], f_t: list[torch.Tensor], p: float,
                       backend: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Fused attention transfer over layer pairs: (loss summed over the pairs, per pair the
    [B, X] map w that backward needs). All maps share one dtype and device; backend in
    cpu / cuda / triton."""
    return KERNELS("attention_transfer_forward", backend)(f_s, f_t, p)


@attention_transfer.register_fake
def _(f_s, f_t, p, backend):
    acc = acc_dtype(f_s[0].dtype)
    return (f_s[0].new_empty((), dtype=acc),
            [f.new_empty((f.shape[0], math.prod(f.shape[2:])), dtype=acc) for f in f_s])


@fused_op("kdfast::attention_transfer_backward")
def attention_transfer_backward(grad_loss: torch.Tensor, f_s: list[torch.Tensor], maps: list[torch.Tensor],
                                p: float, backend: str) -> list[torch.Tensor]:
    """grad_loss · d loss / d f_s for every student map (layout: empty_like(f_s))."""
    return KERNELS("attention_transfer_backward", backend)(grad_loss, f_s, maps, p)


@attention_transfer_backward.register_fake
def _(grad_loss, f_s, maps, p, backend):
    return [torch.empty_like(f) for f in f_s]


def _setup_context(ctx, inputs, output):
    ctx.p, ctx.backend, ctx.pairs = inputs.p, inputs.backend, len(inputs.f_s)
    ctx.save_for_backward(*inputs.f_s, *output[1])


def _backward(ctx, grad_loss):
    saved = ctx.saved_tensors
    f_s, maps = list(saved[:ctx.pairs]), list(saved[ctx.pairs:])
    return attention_transfer_backward(grad_loss, f_s, maps, ctx.p, ctx.backend)


attention_transfer.register_autograd(_backward, setup_context=_setup_context)


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
        backend = KERNELS.backend(op, device, _verify.first_use(
            "attention", op, device, dtype, lambda b: kernel_path(b, group, p), lambda: _slice(group, p, op)))
        if backend == "torch":
            loss = sum(attention_transfer_ref(f_s, f_t, p) for f_s, f_t in group)
        else:
            loss, _ = attention_transfer([s for s, _ in group], [t for _, t in group], float(p), backend)
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
