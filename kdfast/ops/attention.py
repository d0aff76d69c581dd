"""Attention transfer (Zagoruyko & Komodakis 2017), fasterai's formulation.

``attention_map_ref`` / ``attention_transfer_ref`` are the definitions and the torch backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import acc_dtype

KERNELS = ("torch",)


def attention_map_ref(f: torch.Tensor, p: float = 2) -> torch.Tensor:
    """``normalize(mean_c f^p)`` over the spatial positions: [B, C, *S] -> [B, prod(S)]."""
    a = f.to(acc_dtype(f.dtype)).pow(p).mean(1).flatten(1)
    return F.normalize(a, dim=1)


def attention_transfer_ref(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Mean over batch and positions of ``(a(f_s) - a(f_t))²``; channel counts may differ."""
    return F.mse_loss(attention_map_ref(f_s, p), attention_map_ref(f_t.detach(), p))


def attention_transfer(f_s, f_t, p):
    return attention_transfer_ref(f_s, f_t, p)
