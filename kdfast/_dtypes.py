"""The accumulation dtype: the one rule for the precision kdfast computes in.

Inputs may be float16, bfloat16, float32 or float64. Every loss is accumulated, and
returned, in float32, or in float64 when an input is float64: the dtype ATen calls
``opmath`` (the C++ and CUDA kernels use ``at::opmath_type<scalar_t>``, the same rule).
"""
from __future__ import annotations

import torch


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when the inputs' common dtype is float64, else float32."""
    common = dtypes[0]
    for d in dtypes[1:]:
        common = torch.promote_types(common, d)
    return torch.float64 if common == torch.float64 else torch.float32
