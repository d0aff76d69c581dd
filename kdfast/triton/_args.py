"""Kernel arguments as a real Triton launch passes them.

A Python float reaches a kernel as an fp32 parameter (Triton's interpreter keeps it a
double, which hides the difference on the CPU; tests/triton_launch.py makes it round).
A float64 kernel's constants therefore travel as two fp32 halves, ``x = hi + lo``, joined
in the kernel's accumulation dtype (float64: x to ~2^-48 relative; float32: x rounded),
or are computed in the kernel from integer arguments.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def fp32_halves(x: float) -> tuple[float, float]:
    """x as hi + lo, both exactly representable in fp32."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))


@triton.jit
def join_halves(hi, lo, ACC: tl.constexpr):
    """hi + lo in ACC (the two fp32 halves of a float argument, see fp32_halves)."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)
