"""Distributed and mixed-precision distillation with fastai (needs fastai; ``distrib_ctx``
also needs accelerate).

Multi-process training (one process per GPU, or several CPU processes over gloo), launched
with ``torchrun --nproc_per_node N train.py`` or ``accelerate launch --num_processes N
train.py``::

    from kdfast.all import *
    kd = KnowledgeDistillationCallback(teacher, SoftTarget, schedule=cos)
    learn = Learner(dls, student, metrics=accuracy, cbs=kd)
    with distrib_ctx(learn):          # fastai's learn.distrib_ctx(), also on CPUs
        learn.fit_one_cycle(5, 1e-3)

The student is wrapped in DistributedDataParallel and the data split between the ranks by
fastai; the teacher stays an unwrapped, frozen module on each rank's device (it needs no
gradient synchronisation); hooks on the wrapped student resolve with or without the
``module.`` prefix. Every rank sees the same number of batches, so ``pct_train`` and the
KD weight schedule agree across ranks.

Where fastai's distributed code assumes CUDA, :func:`distrib_ctx` applies the workaround:
accelerate on the CPU (``cpu=True``), no ``SyncBatchNorm`` (CUDA only), and a broadcast of
the shuffled indices that works over gloo.

:class:`MixedPrecision` is fastai's callback with autocast on the model's device, so
``MixedPrecision(amp_mode='bf16')`` also trains in bfloat16 on CPUs (fp16 and its
GradScaler stay CUDA-only).
"""
from __future__ import annotations

import contextlib

import torch

import fastai.distributed as _fastai_distributed
from fastai.callback.fp16 import AMPMode
from fastai.callback.fp16 import MixedPrecision as _FastaiMixedPrecision

__all__ = ["distrib_ctx", "MixedPrecision"]


def _broadcast_any_backend(self, t, rank):
    """fastai's DistributedDL._broadcast (shuffled indices from rank 0), on the device the
    process group's backend wants: CUDA for nccl, the CPU for gloo."""
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor(t, dtype=torch.long, device=device)
    torch.distributed.broadcast(t, rank)
    return t.cpu().tolist()


@contextlib.contextmanager
def _gloo_broadcast():
    original = _fastai_distributed.DistributedDL._broadcast
    _fastai_distributed.DistributedDL._broadcast = _broadcast_any_backend
    try:
        yield
    finally:
        _fastai_distributed.DistributedDL._broadcast = original


def _on_cuda(learn) -> bool:
    device = getattr(learn.dls, "device", None)
    if device is not None:
        return torch.device(device).type == "cuda"
    return any(p.is_cuda for p in learn.model.parameters())


@contextlib.contextmanager
def distrib_ctx(learn, sync_bn: bool | None = None, **kwargs):
    """fastai's ``learn.distrib_ctx()``, which also runs on CPU processes over gloo.

    sync_bn: replace BatchNorm with SyncBatchNorm (default: on GPUs only; it is CUDA-only).
    kwargs go to accelerate's ``Accelerator`` (``cpu=True`` is set for CPU training).
    Outside a multi-process launch this does nothing, as fastai's does.
    """
    on_cuda = _on_cuda(learn)
    if sync_bn is None:
        sync_bn = on_cuda
    if not on_cuda:
        kwargs.setdefault("cpu", True)
    guard = contextlib.nullcontext() if on_cuda else _gloo_broadcast()
    with guard, learn.distrib_ctx(sync_bn=sync_bn, **kwargs):
        yield learn


class MixedPrecision(_FastaiMixedPrecision):
    """fastai's ``MixedPrecision`` with autocast on the device the model is on: bfloat16
    also on CPUs; float16 with a GradScaler on CUDA (as fastai)."""

    def before_fit(self):
        device = next((p.device for p in self.learn.model.parameters()), torch.device("cpu"))
        if device.type == "cuda":
            return super().before_fit()
        if self.amp_mode != AMPMode.BF16:
            raise ValueError(f"MixedPrecision: float16 needs a CUDA GPU (the model is on {device}); on the CPU use "
                             f"MixedPrecision(amp_mode='bf16')")
        self.kwargs["enabled"] = False  # bfloat16 has float32's range: no loss scaling
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16)
        self.learn.scaler = torch.amp.GradScaler(device.type, **self.kwargs)
        self.scales = []
