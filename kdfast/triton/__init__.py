"""Triton kernels (imported lazily: only when the triton backend runs)."""
from __future__ import annotations

import functools

import torch


def on_inputs_device(fn):
    """Run ``fn`` with its first tensor argument's CUDA device current: Triton launches on
    the current device, whatever device the tensors are on."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next(a for a in args if isinstance(a, torch.Tensor) or isinstance(a, (list, tuple)) and a)
        tensor = first if isinstance(first, torch.Tensor) else first[0]
        if not tensor.is_cuda:
            return fn(*args, **kwargs)
        with torch.cuda.device(tensor.device):
            return fn(*args, **kwargs)
    return wrapper
