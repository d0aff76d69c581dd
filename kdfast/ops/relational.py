"""Relational losses: RKD distance and angle, PKT, similarity preserving.

The ``*_ref`` functions are the canonical definitions (lenscloth/RKD, RepDistiller, Tung &
Mori; fasterai for similarity) on embeddings ``[B, D]`` and the torch backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import acc_dtype

KERNELS = ("torch",)


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
