"""Backward of the ops that compute their input gradient in the forward pass (one read of
the inputs): the saved gradient, scaled by the incoming gradient."""
from __future__ import annotations

import torch

from .. import _extension
from ._op import fused_op


@fused_op("kdfast::scale_grad_", mutates_args=("grad",))
def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad *= grad_output (broadcast), in place; nothing to do when grad_output is 1.

    Usually grad_output is exactly 1 (``loss.backward()``): the CPU checks for free, the
    CUDA kernel checks on the device.
    """
    if grad.device.type == "cpu":
        if grad_output.numel() == 1 and grad_output.item() == 1:
            return
    elif grad.device.type == "cuda" and _extension.WITH_CUDA:
        torch.ops.kdfast_C.scale_grad_(grad, grad_output)  # decides "== 1" on the device
        return
    grad.mul_(grad_output)


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
    """The input gradient from the one an op computed in forward (for a grad_output of 1).

    When the graph is freed after this backward, the saved gradient is scaled in place
    (no pass at all when grad_output is 1); when it is kept (retain_graph, gradcheck,
    jacobians), a scaled copy leaves it intact for the next backward. Tracers (fake and
    functional tensors: torch.compile, opcheck) get the out-of-place form too.
    """
    if type(grad) is not torch.Tensor or _graph_is_kept():
        return grad * grad_output
    scale_grad_(grad, grad_output)
    return grad
