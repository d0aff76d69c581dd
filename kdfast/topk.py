"""Sparse teachers: the top-k classes of each teacher row, as stored for offline distillation.

A dense teacher row costs V numbers per token (256 KB at V = 128k in bfloat16); its top-k
log-probabilities cost k (DistillKit stores k = 50). kdfast's logit losses take a
``TopK(indices, logprobs)`` wherever they take teacher logits::

    topk = kdfast.topk_logits(teacher_logits, k=64)        # once, offline or on the fly
    loss = KF.jsd(student_logits, topk, beta=0.5)          # tail="bucket" by default

What the classes outside the top-k mean is the ``tail`` argument of the losses:
``"bucket"`` (default) makes them one more class, the teacher's missing mass
``1 - sum_K p`` against the student's own mass outside K (from its full softmax);
``"renormalize"`` restricts both distributions to K and renormalises them there (biased
when the tail holds mass: it is simply dropped).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _checks as checks


class TopK(NamedTuple):
    """A sparse teacher: per row, ``k`` class indices and the teacher's log-probabilities there.

    indices: int32 or int64, the logits' shape with the class dim replaced by k, distinct
    classes in [0, V) per row. logprobs: float32 or bfloat16, same shape: the teacher's
    log-softmax at T = 1 over the full vocabulary (``kdfast.topk_logits`` makes both).
    """
    indices: torch.Tensor
    logprobs: torch.Tensor


# Rows per chunk in topk_logits by default: 2^24 fp32 log-probabilities (64 MB) at a time.
_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(x: torch.Tensor, chunk_rows: int):
    """(out_index, rows) pairs covering x [..., V] (class dim last) in chunks of at most
    chunk_rows rows, without copying x: a flat [R, V] view when x has one, else recursing
    over its leading dim."""
    V = x.shape[-1]
    try:
        flat = x.view(-1, V)
    except RuntimeError:  # leading dims that do not merge (e.g. a permuted tensor)
        for i in range(x.shape[0]):
            for index, rows in _row_chunks(x[i], chunk_rows):
                yield (i,) + index, rows
        return
    for r0 in range(0, flat.shape[0], chunk_rows):
        yield (slice(r0, r0 + chunk_rows),), flat[r0:r0 + chunk_rows]


@torch.no_grad()
def topk_logits(teacher_logits: torch.Tensor, k: int, dim: int = -1, chunk_rows: int | None = None,
                dtype: torch.dtype = torch.float32) -> TopK:
    """The ``k`` most probable classes of each teacher row and their log-probabilities (T = 1).

    Computed a chunk of rows at a time (``log_softmax`` in float32, then ``topk``), so the
    memory beyond the output is one chunk's: ``chunk_rows`` rows (default: 2^24 / V, i.e.
    64 MB of float32 log-probabilities). Returns ``TopK(indices, logprobs)`` shaped like
    the logits with ``dim`` of size k: int32 indices (int64 beyond 2^31 classes), log-
    probabilities in ``dtype`` (float32, or bfloat16 to halve the storage). Never receives
    gradient.
    """
    op = "topk_logits"
    checks.check_tensor(teacher_logits, "teacher_logits", op)
    dim = checks.check_dim(teacher_logits, dim, op, "teacher_logits")
    V = teacher_logits.shape[dim]
    k = checks.check_k(k, V, op)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"{op}: dtype must be a floating dtype for the log-probabilities (torch.float32 or "
                        f"torch.bfloat16), got {dtype}")
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMENTS // V)
    elif isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"{op}: chunk_rows must be a positive int (rows per chunk), got {chunk_rows!r}")
    x = teacher_logits.movedim(dim, -1)
    index_dtype = torch.int32 if V <= 2**31 - 1 else torch.int64
    indices = torch.empty(x.shape[:-1] + (k,), dtype=index_dtype, device=x.device)
    logprobs = torch.empty(x.shape[:-1] + (k,), dtype=dtype, device=x.device)
    acc = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    for index, rows in _row_chunks(x, chunk_rows):
        values, top = F.log_softmax(rows.to(acc), dim=-1).topk(k, dim=-1)
        _out_rows(indices, index, k).copy_(top)
        _out_rows(logprobs, index, k).copy_(values)
    return TopK(indices.movedim(-1, dim), logprobs.movedim(-1, dim))


def _out_rows(out: torch.Tensor, index: tuple, k: int) -> torch.Tensor:
    """The rows of the (contiguous) output matching a chunk from _row_chunks."""
    *lead, rows = index
    target = out[tuple(lead)] if lead else out
    return target.reshape(-1, k)[rows]
