"""How per-row losses become the loss: the reductions and their divisors."""
from __future__ import annotations

import torch

REDUCTIONS = ("none", "batchmean", "sum", "mean")


def reduction_divisor(reduction: str, batch_size: int, rows: int, kept: torch.Tensor | None):
    """What the sum of row losses is divided by.

    'batchmean': the input's dim-0 size, as torch's KLDivLoss (fasterai's numbers); with a
    target, the number of rows kept (token-level distillation). 'mean': the number of rows
    (kept). 'sum' and 'none': 1. A divisor of 0 (every row ignored) counts as 1: loss 0.
    """
    if reduction in ("sum", "none"):
        return 1
    if kept is not None:
        return kept.sum().clamp_min(1)
    return batch_size if reduction == "batchmean" else rows


def reduce_rows(rows: torch.Tensor, reduction: str, batch_size: int, kept: torch.Tensor | None) -> torch.Tensor:
    """Apply ``reduction`` to per-row losses (rows outside ``kept`` are already 0)."""
    if reduction == "none":
        return rows
    return rows.sum() / reduction_divisor(reduction, batch_size, rows.numel(), kept)
