"""Fused linear distillation: the LM heads, the divergence and the cross-entropy in one op, so
that the [tokens, vocab] logits never exist.

    loss = soft_weight · KD(student logits, teacher) + hard_weight · CE(student logits, target)

with student logits ``z = h Wᵀ + b`` ([N, H] hidden states, [V, H] weight), the teacher as
hidden states and its own head (any width), dense logits or a sparse TopK, and KD any
softmax divergence of kdfast.ops.softmax_kl (forward KL, reverse KL, JSD(β), TVD, with their
T² / T scaling), both terms summed over the tokens whose target is not ``ignore_index`` and
divided by their count ('mean') or not ('sum').

``fused_linear_kd_ref`` is the definition (and the test oracle): the logits materialised,
the divergence by kdfast's reference functions, the cross-entropy by F.cross_entropy.

``kdfast::fused_linear_kd`` computes the same a chunk of rows at a time, and computes the
gradients in the forward pass (as Liger-Kernel's chunked losses do), so that backward only
scales them by the incoming gradient. Per chunk of c rows:

1. ``z = h_c Wᵀ + b`` and the teacher's logits, [c, V] in float32 (float64 for float64);
2. the fused divergence kernel of the chosen backend (``kdfast::softmax_kl`` /
   ``softmax_kl_topk``: C++ on the CPU, CUDA or Triton on a GPU) gives the chunk's loss and
   ``g = d loss / d z`` in one go; the torch backend takes the reference divergence and its
   autograd gradient on the chunk instead;
3. the cross-entropy from the same logits tile: ``log_softmax(z)`` once, the rows' loss
   ``-log q_y``, and ``g += w_ce (softmax(z) - onehot(y))`` in place (the divergence kernels
   do not return their log-sum-exp, so this costs one log_softmax and two elementwise
   passes over the tile, about as much as the divergence kernel itself; none when
   hard_weight = 0);
4. ``grad_h[c] = g W``, ``grad_W += gᵀ h_c``, ``grad_b += Σ_rows g``.

Memory beyond the inputs and the gradients: a few [c, V] tiles (student and teacher logits,
g, the cross-entropy's tile) and, for bfloat16 / float16 weights, the float32 accumulator of
``grad_W`` (and on the CPU a float32 copy of W): O(c·V + V·H), independent of N.

Precision: logits, divergence and gradient in float32 (Liger #1432: rounding the GEMM's
output to bfloat16 before the softmax gives 4-23% gradient error, as ``q - p`` cancels);
``grad_W`` accumulated over the chunks in float32 and rounded to the weight's dtype once at
the end. On a GPU the matmuls of bfloat16 / float16 operands run in that dtype with float32
outputs (``out_dtype``; ``g`` is rounded to the operands' dtype for the two gradient
matmuls, as every fused linear loss does); on the CPU they run in float32 on upcast copies.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import _verify
from .._dtypes import acc_dtype
from . import softmax_kl as _skl
from ._op import fused_op
from ._reduction import reduction_divisor
from ._saved_grad import scale_saved_grad

KERNELS = _skl.KERNELS  # the divergence kernels it runs on each chunk
REDUCTIONS = ("mean", "sum")

# Chunk size rule: rows per chunk so that one float32 [rows, V] tile is about TILE_BYTES
# (about four such tiles are alive at once: the student's and the teacher's logits, the
# gradient, the cross-entropy's), rounded down to a multiple of ROW_MULTIPLE, at least
# ROW_MULTIPLE and at most N. CPU: 32 MiB (256 rows at V = 32000): the matmuls then see
# enough rows that W and grad_W, re-read once per chunk, are not what bounds them (measured
# at N = 2048, V = 32000, H = 256: 128 rows ~8% slower, 384 no faster), while the extra memory
# stays a few percent of the materialised path's; the row kernels stream each row through
# the caches whatever the tile. GPU: 1/128 of the device's memory, clamped to
# [256 MiB, 1 GiB] (2048 rows at V = 128256 on an 80-141 GB GPU: GEMMs large enough to run
# at full speed, ~4 GiB of tiles).
CPU_TILE_BYTES = 32 << 20
GPU_TILE_BYTES = (256 << 20, 1 << 30)
ROW_MULTIPLE = {"cpu": 16, "cuda": 64}


def default_chunk_size(rows: int, num_classes: int, device: torch.device) -> int:
    """Rows per chunk by the rule above (``chunk_size=None``)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        tile = min(max(total // 128, GPU_TILE_BYTES[0]), GPU_TILE_BYTES[1])
    else:
        tile = CPU_TILE_BYTES
    multiple = ROW_MULTIPLE.get(device.type, 16)
    chunk = max(multiple, tile // (4 * num_classes) // multiple * multiple)
    return max(1, min(chunk, rows))


# ----------------------------------------------------------------------------------------
# The definition


def fused_linear_kd_ref(h, w, b, t_hidden, t_weight, t_bias, t_logits, indices, logprobs, target, divergence,
                        beta, T, soft_weight, hard_weight, ignore_index, tail, reduction):
    """(loss, KD, CE) with the logits materialised: the definition of the op.

    h [N, H], w [V, H], b [V] or None; the teacher is ``(t_hidden [N, H_t], t_weight
    [V, H_t], t_bias)``, ``t_logits`` [N, V] or a top-k ``(indices, logprobs)`` [N, k]
    (the others None); target [N] or None (every row kept). KD and CE are the unweighted
    reductions; loss = soft_weight·KD + hard_weight·CE. Teacher under no_grad.
    """
    acc = acc_dtype(h.dtype, w.dtype)
    z = F.linear(h.to(acc), w.to(acc), None if b is None else b.to(acc))
    kept = None if target is None else target != ignore_index
    divisor = reduction_divisor(reduction, z.shape[0], z.shape[0], kept)
    with torch.no_grad():
        if t_weight is not None:
            t_logits = F.linear(t_hidden.to(acc), t_weight.to(acc), None if t_bias is None else t_bias.to(acc))
    if indices is not None:
        kd = _skl.softmax_kl_topk_ref(z, indices, logprobs, target, 1, T, ignore_index, divergence, beta, tail, "sum")
    else:
        kd = _skl.softmax_kl_ref(z, t_logits.detach(), target, 1, T, ignore_index, False, 1.0, 8.0, False, "sum",
                                 divergence, beta)
    if target is None:
        ce = z.new_zeros(())
    else:
        ce = F.cross_entropy(z, target.masked_fill(~kept, ignore_index), ignore_index=ignore_index,
                             reduction="sum")
    kd, ce = kd / divisor, ce / divisor
    return soft_weight * kd + hard_weight * ce, kd, ce


# ----------------------------------------------------------------------------------------
# The chunked op


@functools.cache
def _has_out_dtype(device: torch.device) -> bool:
    """Whether this device's matmuls take ``out_dtype`` (bf16/fp16 operands, fp32 output)."""
    try:
        x = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        acc = torch.zeros(2, 2, dtype=torch.float32, device=device)
        torch.mm(x, x, out_dtype=torch.float32)
        torch.addmm(acc, x, x, out_dtype=torch.float32, out=acc)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


class _Head:
    """A linear head ``x Wᵀ + b`` computed a chunk of rows at a time, its output in the
    accumulation dtype ``acc``; and the gradients of the chunk's rows."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, acc: torch.dtype):
        self.x, self.acc = x, acc
        low = x.dtype != acc or w.dtype != acc
        # GPU: bf16/fp16 matmuls with float32 output; otherwise float32 copies (once, V x H).
        self.out_dtype = low and x.is_cuda and x.dtype == w.dtype and _has_out_dtype(x.device)
        self.w = w if not low or self.out_dtype else w.to(acc)
        self.b = None if b is None else b.to(acc)

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        x = self.x[r0:r1]
        return x if self.out_dtype else x.to(self.acc)

    def logits(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The logits of rows r0:r1, written into ``out`` ([>= r1 - r0, V] in acc, reused
        from chunk to chunk: no fresh pages to fault in) when given."""
        x = self.rows(r0, r1)
        if out is not None:
            out = out[:r1 - r0]
        if self.out_dtype:
            z = torch.mm(x, self.w.t(), out_dtype=self.acc)
            return z if self.b is None else z.add_(self.b)
        if self.b is None:
            return torch.mm(x, self.w.t(), out=out) if out is not None else x @ self.w.t()
        return torch.addmm(self.b, x, self.w.t(), out=out) if out is not None else torch.addmm(self.b, x, self.w.t())

    def tile(self, rows: int) -> torch.Tensor | None:
        """A buffer for ``logits(..., out=)`` (None where the matmul allocates its output)."""
        if self.out_dtype:
            return None
        return torch.empty((rows, self.w.shape[0]), dtype=self.acc, device=self.x.device)

    def backward(self, g: torch.Tensor, r0: int, r1: int, grad_x: torch.Tensor, grad_w: torch.Tensor,
                 grad_b: torch.Tensor | None) -> None:
        """grad_x[r0:r1] = g W, grad_w += gᵀ x[r0:r1] (accumulated in acc), grad_b += Σ g."""
        x = self.rows(r0, r1)
        if self.out_dtype:
            g_low = g.to(self.w.dtype)
            torch.mm(g_low, self.w, out=grad_x[r0:r1])
            torch.addmm(grad_w, g_low.t(), x, out_dtype=self.acc, out=grad_w)
        else:
            if grad_x.dtype == self.acc:
                torch.mm(g, self.w, out=grad_x[r0:r1])
            else:
                grad_x[r0:r1] = g @ self.w
            grad_w.addmm_(g.t(), x)
        if grad_b is not None:
            grad_b.add_(g.sum(0))


def _cross_entropy_(z: torch.Tensor, target: torch.Tensor, ignore_index: int, scale: torch.Tensor,
                    grad: torch.Tensor | None, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy of the logits tile z [c, V] against target [c]: (scale · Σ_kept
    (logsumexp z - z_y), the gradient). With ``compute_grad``, ``scale · (softmax(z) -
    onehot(y))`` on the kept rows is added to ``grad`` in place (or becomes the gradient when
    ``grad`` is None); ignored rows get exactly 0, NaN logits included. F.cross_entropy is the
    definition (fused_linear_kd_ref); here the log_softmax tile is reused for the gradient."""
    kept = target != ignore_index
    y = target.masked_fill(~kept, 0).long().unsqueeze(1)
    ls = torch.log_softmax(z, 1)
    loss = torch.where(kept, -ls.gather(1, y).squeeze(1), 0).sum() * scale
    if not compute_grad:
        return loss, grad
    p = ls.exp_()
    p.scatter_add_(1, y, torch.full_like(y, -1, dtype=p.dtype))
    p.masked_fill_(~kept.unsqueeze(1), 0)
    if grad is None:
        return loss, p.mul_(scale)
    return loss, grad.addcmul_(p, scale)


def _chunk_kd(z, teacher, target, divergence, beta, T, ignore_index, renormalize, weight, divisor, compute_grad,
              backend):
    """weight · (the chunk's divergence rows summed) / divisor, and its gradient w.r.t. z."""
    if backend == "torch":
        with torch.enable_grad():
            zz = z.detach().requires_grad_(compute_grad)
            if len(teacher) == 2:
                loss = _skl.softmax_kl_topk_ref(zz, *teacher, target, 1, T, ignore_index, divergence, beta,
                                                "renormalize" if renormalize else "bucket", "sum", weight, divisor)
            else:
                loss = _skl.softmax_kl_ref(zz, teacher[0], target, 1, T, ignore_index, False, 1.0, 8.0, False, "sum",
                                           divergence, beta, weight, divisor)
            grad = torch.autograd.grad(loss, zz)[0] if compute_grad else None
        return loss.detach(), grad
    if len(teacher) == 2:
        loss, grad = _skl.softmax_kl_topk.fn(z, *teacher, target, 1, T, ignore_index, divergence, beta, renormalize,
                                             "sum", weight, divisor, compute_grad, backend)
    else:
        loss, grad = _skl.softmax_kl.fn(z, teacher[0], target, 1, T, ignore_index, divergence, beta, False, 1.0, 8.0,
                                        "sum", weight, divisor, compute_grad, backend)
    return loss, grad if compute_grad else None


def _chunk_ce(z, target, ignore_index, weight, divisor, grad, compute_grad, backend):
    if backend == "torch":  # the reference and its autograd gradient
        with torch.enable_grad():
            zz = z.detach().requires_grad_(compute_grad)
            loss = F.cross_entropy(zz, target, ignore_index=ignore_index, reduction="sum")
            loss = loss * weight / divisor.to(z.dtype)
            if compute_grad:
                g = torch.autograd.grad(loss, zz)[0]
                grad = g if grad is None else grad.add_(g)
        return loss.detach(), grad
    scale = (weight / divisor).to(z.dtype)
    return _cross_entropy_(z, target, ignore_index, scale, grad, compute_grad)


@fused_op("kdfast::fused_linear_kd", grads=("h", "w", "b"))
def fused_linear_kd(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t_hidden: torch.Tensor | None,
                    t_weight: torch.Tensor | None, t_bias: torch.Tensor | None, t_logits: torch.Tensor | None,
                    indices: torch.Tensor | None, logprobs: torch.Tensor | None, target: torch.Tensor | None,
                    divergence: str, beta: float, T: float, soft_weight: float, hard_weight: float,
                    ignore_index: int, renormalize: bool, reduction: str, chunk_size: int, parts: bool,
                    compute_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                               torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked fused linear distillation (see the module's docstring): (loss, KD, CE, grad_h,
    grad_w, grad_b); KD and CE unweighted, computed when their weight is not 0 or ``parts``
    (else 0); gradients empty without ``compute_grad`` (grad_b also without b)."""
    acc = acc_dtype(h.dtype, w.dtype)
    N = h.shape[0]
    kept = None if target is None else target != ignore_index
    divisor = reduction_divisor(reduction, N, N, kept)
    divisor = (divisor if isinstance(divisor, torch.Tensor) else torch.tensor(divisor)).to(h.device, torch.float64)
    student = _Head(h, w, b, acc)
    teacher = None if t_weight is None else _Head(t_hidden, t_weight, t_bias, acc)
    if compute_grad:
        grad_h = torch.empty_like(h, memory_format=torch.contiguous_format)
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device)
        grad_b = None if b is None else torch.zeros(b.shape, dtype=acc, device=b.device)
    kd_total = torch.zeros((), dtype=acc, device=h.device)
    ce_total = torch.zeros((), dtype=acc, device=h.device)
    do_kd, do_ce = soft_weight != 0 or parts, target is not None and (hard_weight != 0 or parts)
    rows = min(chunk_size, N)
    z_tile = student.tile(rows)
    t_tile = teacher.tile(rows) if teacher is not None and do_kd else None
    for r0 in range(0, N, chunk_size):
        r1 = min(N, r0 + chunk_size)
        z = student.logits(r0, r1, z_tile)
        tc = None if target is None else target[r0:r1]
        g = None
        if do_kd:
            if indices is not None:
                chunk_teacher = (indices[r0:r1], logprobs[r0:r1])
            elif teacher is not None:
                chunk_teacher = (teacher.logits(r0, r1, t_tile),)
            else:
                chunk_teacher = (t_logits[r0:r1].to(acc),)
            weight = soft_weight if soft_weight != 0 else 1.0
            loss, g = _chunk_kd(z, chunk_teacher, tc, divergence, beta, T, ignore_index, renormalize, weight,
                                divisor, compute_grad and soft_weight != 0, backend)
            del chunk_teacher
            kd_total += loss / weight
        if do_ce:
            weight = hard_weight if hard_weight != 0 else 1.0
            loss, g = _chunk_ce(z, tc, ignore_index, weight, divisor, g, compute_grad and hard_weight != 0, backend)
            ce_total += loss / weight
        del z
        if compute_grad and g is not None:
            student.backward(g, r0, r1, grad_h, grad_w, grad_b)
        elif compute_grad:  # neither term has a weight: the gradient is 0
            grad_h[r0:r1] = 0
        del g
    loss = soft_weight * kd_total + hard_weight * ce_total
    if not compute_grad:
        empty = h.new_empty(0)
        return loss, kd_total, ce_total, empty, empty, empty
    grad_w = grad_w.to(w.dtype)
    grad_b = h.new_empty(0) if grad_b is None else grad_b.to(b.dtype)
    return loss, kd_total, ce_total, grad_h, grad_w, grad_b


@fused_linear_kd.register_fake
def _(h, w, b, t_hidden, t_weight, t_bias, t_logits, indices, logprobs, target, divergence, beta, T, soft_weight,
      hard_weight, ignore_index, renormalize, reduction, chunk_size, parts, compute_grad, backend):
    acc = acc_dtype(h.dtype, w.dtype)
    scalar = h.new_empty((), dtype=acc)
    if not compute_grad:
        return scalar, scalar.clone(), scalar.clone(), h.new_empty(0), h.new_empty(0), h.new_empty(0)
    grad_h = torch.empty_like(h, memory_format=torch.contiguous_format)
    grad_b = h.new_empty(0) if b is None else torch.empty_like(b, memory_format=torch.contiguous_format)
    return scalar, scalar.clone(), scalar.clone(), grad_h, w.new_empty(w.shape), grad_b


def _setup_context(ctx, inputs, output):
    ctx.has_bias = inputs.b is not None
    ctx.save_for_backward(*output[3:])


def _backward(ctx, grad_loss):
    grad_h, grad_w, grad_b = ctx.saved_tensors
    return (scale_saved_grad(grad_h, grad_loss), scale_saved_grad(grad_w, grad_loss),
            scale_saved_grad(grad_b, grad_loss) if ctx.has_bias else None)


fused_linear_kd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# Running it


def _verification(op, h, w, b, teacher_args, target, kw):
    """Verified first use of the divergence kernel a call runs (kdfast/_verify.py), on the
    logits of its first rows (the GEMMs are the device's own)."""
    k = _verify.ROWS
    t_hidden, t_weight, t_bias, t_logits, indices, logprobs = teacher_args
    acc = acc_dtype(h.dtype, w.dtype)

    memo = []

    def logits():  # built once, only when a check runs
        if memo:
            return memo[0]
        with torch.no_grad():
            z = _Head(h[:k], w, b, acc).logits(0, min(k, h.shape[0]))
            if t_weight is not None:
                zt = _Head(t_hidden[:k], t_weight, t_bias, acc).logits(0, z.shape[0])
            else:
                zt = None if t_logits is None else t_logits[:k].to(acc)
        memo.append((z, zt))
        return z, zt

    tc = None if target is None else target[:k]
    if indices is not None:
        topk_kw = {key: kw[key] for key in ("T", "ignore_index", "divergence", "jsd_beta", "tail")}
        return _verify.first_use("softmax_kl", op, h.device, acc, lambda backend: _skl.topk_kernel_path(backend,
                                                                                                     kw["tail"]),
                                 lambda: _skl._topk_slice(logits()[0], indices[:k], logprobs[:k], tc, 1,
                                                          dict(topk_kw, reduction="sum", op=op)))
    dense_kw = {key: kw[key] for key in ("T", "ignore_index", "divergence", "jsd_beta")}
    return _verify.first_use("softmax_kl", op, h.device, acc,
                             lambda backend: _skl.kernel_path(backend, *logits(), 1),
                             lambda: _skl._slice(*logits(), tc, 1, dict(dense_kw, reduction="sum", op=op)))


def fused_linear_kd_loss(h, w, b, teacher_args, target, *, divergence, beta, T, soft_weight, hard_weight,
                         ignore_index, tail, reduction, chunk_size, parts, op="fused_linear_kd"):
    """Run the op on the chosen backend (inputs validated and flattened to rows by
    kdfast.functional): (loss, KD, CE), KD and CE detached (for logging)."""
    teacher_args = tuple(None if x is None else x.detach() for x in teacher_args)
    target = None if target is None else target.long()  # the kernels' and F.cross_entropy's index dtype
    if chunk_size is None:
        chunk_size = default_chunk_size(h.shape[0], w.shape[0], h.device)
    kw = dict(T=T, ignore_index=ignore_index, divergence=divergence, jsd_beta=beta, tail=tail)
    backend = KERNELS.backend(op, h.device, _verification(op, h, w, b, teacher_args, target, kw))
    compute_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h, w, b))
    if backend == "torch" and torch.compiler.is_compiling():
        # The reference's chunks take their gradient by autograd, which a traced custom op's
        # body cannot run: traced, the torch backend is the definition itself.
        loss, kd, ce = fused_linear_kd_ref(h, w, b, *teacher_args, target, divergence, beta, T, soft_weight,
                                           hard_weight, ignore_index, tail, reduction)
        return loss, kd.detach(), ce.detach()
    loss, kd, ce, *_ = fused_linear_kd(h, w, b, *teacher_args, target, divergence, float(beta), float(T),
                                       float(soft_weight), float(hard_weight), int(ignore_index),
                                       tail == "renormalize", reduction, int(chunk_size), bool(parts), compute_grad,
                                       backend)
    return loss, kd.detach(), ce.detach()


