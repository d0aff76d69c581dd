"""Pieces shared by kdfast's custom ops: reductions, accumulation dtypes, and the in-place
gradient scaling used by ops that compute their input gradient in the forward pass."""
from __future__ import annotations

import torch

from .. import _extension

REDUCTIONS = ("none", "batchmean", "sum", "mean")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kdfast accumulates in: float32 for half/bfloat16/float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _scale_grad(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad *= grad_output (broadcast), in place; nothing to do when grad_output is 1.

    Ops that compute their input gradient during the forward pass (one read of the inputs)
    save it and scale it here in backward. Usually grad_output is exactly 1
    (``loss.backward()``): the CPU checks for free, the CUDA kernel checks on the device.
    """
    if grad.device.type == "cpu":
        if grad_output.numel() == 1 and grad_output.item() == 1:
            return
    elif grad.device.type == "cuda" and _extension.WITH_CUDA:
        torch.ops.kdfast_C.scale_grad_(grad, grad_output)  # decides "== 1" on the device
        return
    grad.mul_(grad_output)


scale_grad_ = torch.library.custom_op("kdfast::scale_grad_", _scale_grad, mutates_args=("grad",))


@scale_grad_.register_fake
def _(grad, grad_output):
    return None


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph / create_graph)."""
    try:
        return torch._C._autograd._get_current_graph_task_keep_graph()
    except (AttributeError, RuntimeError):  # not inside the autograd engine, or an older torch
        return True


def scale_saved_grad(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """The input gradient from one an op computed in forward (for a grad_output of 1).

    When the graph is freed after this backward, the saved gradient is scaled in place
    (no pass at all when grad_output is 1); when it is kept (retain_graph, gradcheck,
    jacobians), a scaled copy leaves it intact for the next backward. Tracers (fake and
    functional tensors: torch.compile, opcheck) get the out-of-place form too.
    """
    if type(grad) is not torch.Tensor or _graph_is_kept():
        return grad * grad_output
    (scale_grad_ if traced((grad, grad_output)) else _scale_grad)(grad, grad_output)
    return grad


def traced(tensors) -> bool:
    """Whether these op inputs are being traced or transformed: torch.compile, functorch
    transforms (vmap, grad), or tensor subclasses (fake, functional tensors)."""
    transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)
    return (torch.compiler.is_compiling() or transforms_active()
            or any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors if isinstance(t, torch.Tensor)))


def custom_op(name: str):
    """``torch.library.custom_op`` (no mutated arguments) that keeps the plain function for
    ``eager_autograd``."""
    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.plain_fn = fn
        return op
    return wrap


def eager_autograd(op, setup_context, backward):
    """Register ``backward`` as the custom op's autograd and return a caller with a fast path.

    The custom op's autograd wrapper normalises its arguments in Python on every call
    (~0.1 ms on a CPU core: as long as the kernels at the small sizes of a training step).
    Eager calls run the same function, setup_context and backward in a plain
    autograd.Function instead; traced calls (see ``traced``) go through the custom op.
    """
    op.register_autograd(backward, setup_context=setup_context)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = op.plain_fn(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Eager.__name__ = Eager.__qualname__ = f"{op.plain_fn.__name__}_eager"

    def call(*args):
        return op(*args) if traced(args) else Eager.apply(*args)
    return call
