"""The one shape of a kdfast op, and the one place where an op's backend and kernels are found.

Every family module (``kdfast/ops/<family>.py``) is written the same way, as in
pytorch/extension-cpp's ``ops.py``::

    KERNELS = Kernels("family")                      # backends; kernels by name (see Kernels)

    @fused_op("kdfast::family", grads=("s",))        # the inputs that receive a gradient
    def family(s: Tensor, t: Tensor, T: float, compute_grad: bool, backend: str) -> tuple[Tensor, Tensor]:
        return KERNELS("family", backend)(s, t, T, compute_grad)   # (loss, by-products)

    @family.register_fake
    def _(s, t, T, compute_grad, backend):           # shapes and dtypes only
        return s.new_empty(()), torch.empty_like(s) if compute_grad else s.new_empty(0)

    def _setup_context(ctx, inputs, output):         # inputs by name: inputs.T
        ctx.save_for_backward(output[1])

    def _backward(ctx, grad_loss):                   # one gradient per name in grads
        return scale_saved_grad(ctx.saved_tensors[0], grad_loss)

    family.register_autograd(_backward, setup_context=_setup_context)

    loss, _ = family(s, t, 4.0, needs_grad(s), KERNELS.backend("family", s.device))

What every op shares, so that no family writes it again:

- The first output is the loss; the others are by-products saved for backward (gradients,
  maps), never differentiated. Gradients are not materialised: when no gradient reaches the
  loss, backward is not called and every input gets None.
- ``_backward(ctx, grad_loss)`` returns the gradients of the inputs named in ``grads``, in
  that order (one value for one name); the other inputs get None, ``[None, ...]`` for tensor
  lists. ``setup_context`` gets the inputs as a named tuple (``inputs.T``). Adding an
  argument to an op changes neither.
- An op with a ``compute_grad`` argument refuses to backpropagate a call made without it.
- Calling the op: traced calls (torch.compile, functorch transforms, fake or functional
  tensors) go through the ``torch.library`` custom op; eager calls run the same function,
  setup_context and backward in a plain ``torch.autograd.Function`` that tracks only the
  inputs named in ``grads`` (tensor lists spliced in), without the custom op's per-call
  argument handling in Python (~0.1 ms a step on a CPU core: as long as the kernels at the
  sizes of a training step).
  An op without autograd (a backward op, an in-place helper) runs its function directly.
"""
from __future__ import annotations

import collections
import importlib
import inspect
from collections.abc import Callable, Iterator, Sequence

import torch

from .._backend import BACKENDS, select_backend

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def traced(args: Sequence) -> bool:
    """Whether an op called with these arguments is being traced or transformed:
    torch.compile, functorch transforms (vmap, grad), or tensor subclasses (fake,
    functional tensors) among the tensors, tensor lists included."""
    if torch.compiler.is_compiling() or _transforms_active():
        return True
    for a in args:
        if type(a) is list:
            for t in a:
                if type(t) not in _PLAIN_TENSORS:
                    return True
        elif isinstance(a, torch.Tensor) and type(a) not in _PLAIN_TENSORS:
            return True
    return False


def needs_grad(x: torch.Tensor) -> bool:
    """Whether a call should compute the gradient with respect to x (``compute_grad``)."""
    return torch.is_grad_enabled() and x.requires_grad


class Kernels:
    """An op family's backends and compiled kernels: the one kernel resolver.

    ``kernels.backend(op, device)`` picks the backend of a call (the one forced by
    ``kdfast.use_backend`` / ``KDFAST_BACKEND``, or auto's choice); every kdfast op picks
    its backend there. ``kernels(name, backend)`` is the kernel ``name`` on that backend:
    ``torch.ops.kdfast_C.<name>`` on cpu and cuda (one schema in csrc/kdfast.cpp, one
    implementation registered per device), the function of that name in
    ``kdfast/triton/<family>.py`` on triton (imported on first use; ``triton`` maps names
    that differ there). Iterating gives the backend names (``kdfast info``, tests).
    """

    def __init__(self, family: str, triton: dict[str, str] | None = None, backends: Sequence[str] = BACKENDS):
        self.family = family
        self.backends = tuple(backends)
        self.triton_names = dict(triton or {})

    def __iter__(self) -> Iterator[str]:
        return iter(self.backends)

    def __len__(self) -> int:
        return len(self.backends)

    def __contains__(self, backend) -> bool:
        return backend in self.backends

    def __repr__(self) -> str:
        return f"Kernels({self.family!r}: {', '.join(self.backends)})"

    def backend(self, op: str, device: torch.device, check: Callable[[str], bool] | None = None) -> str:
        """The backend that runs ``op`` (the user-facing name, for errors) on ``device``;
        ``check``: verified first use of GPU kernels (kdfast/_verify.py ``first_use``)."""
        return select_backend(op, self.backends, device, check)

    def __call__(self, name: str, backend: str) -> Callable:
        # Looked up on every call (a dictionary lookup or two), so that a replaced kernel
        # function (tests inject faults this way) takes effect at once.
        if backend == "triton":
            module = importlib.import_module(f"kdfast.triton.{self.family}")
            return getattr(module, self.triton_names.get(name, name))
        return getattr(torch.ops.kdfast_C, name)


class FusedOp:
    """A kdfast custom op (see the module's docstring): ``torch.library.custom_op`` with the
    shared autograd conventions and the eager fast path. ``op.custom_op`` is the
    ``torch.library`` op (``torch.ops.kdfast.<name>``)."""

    def __init__(self, name: str, fn: Callable, grads: Sequence[str], mutates_args: Sequence[str]):
        names = list(inspect.signature(fn).parameters)
        unknown = [g for g in grads if g not in names]
        if unknown:
            raise TypeError(f"{name}: grads names {unknown}, not arguments of the op ({', '.join(names)})")
        self.name, self.fn = name, fn
        self.custom_op = torch.library.custom_op(name, fn, mutates_args=tuple(mutates_args))
        arguments = self.custom_op._opoverload._schema.arguments
        self._arity = len(arguments)
        self._inputs = collections.namedtuple(f"{fn.__name__}_inputs", names)
        self._lists = tuple(i for i, a in enumerate(arguments) if isinstance(a.type, torch.ListType))
        self._grads = tuple(names.index(g) for g in grads)
        self._compute_grad = names.index("compute_grad") if "compute_grad" in names else None
        self._eager = None
        self.__name__, self.__doc__ = fn.__name__, fn.__doc__

    def register_fake(self, fake: Callable) -> Callable:
        return self.custom_op.register_fake(fake)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        """``backward(ctx, grad_loss)`` -> the gradients of the inputs named in ``grads``."""
        name, lists, grad_positions, arity = self.name, self._lists, self._grads, self._arity
        compute_grad_at, named_inputs = self._compute_grad, self._inputs

        def setup(ctx, inputs, output):
            ctx.set_materialize_grads(False)  # by-products are saved, not differentiated
            if lists:
                ctx.kdfast_list_lengths = {i: len(inputs[i]) for i in lists}
            if compute_grad_at is not None:
                ctx.kdfast_compute_grad = inputs[compute_grad_at]
            setup_context(ctx, named_inputs(*inputs), output)

        def found_grads(ctx, grad_loss):
            """The gradients of the inputs named in grads, in order; None when no gradient
            reached the loss."""
            if grad_loss is None:
                return None
            if compute_grad_at is not None and not ctx.kdfast_compute_grad:
                raise RuntimeError(f"{name} was called with compute_grad=False and cannot backpropagate")
            found = backward(ctx, grad_loss)
            return (found,) if len(grad_positions) == 1 else found

        def input_grads(ctx, grad_loss, *_by_products):
            """One gradient per argument of the op (the custom op's autograd)."""
            grads = [None] * arity
            found = found_grads(ctx, grad_loss)
            if found is not None:
                for i, g in zip(grad_positions, found):
                    grads[i] = g
            for i in lists:
                if grads[i] is None:
                    grads[i] = [None] * ctx.kdfast_list_lengths[i]
            return tuple(grads)

        def eager_grads(ctx, grad_loss, *_by_products):
            """One gradient per tensor the eager Function tracks: those of grads, lists spliced."""
            found = found_grads(ctx, grad_loss)
            flat = [None]  # the arguments tuple
            for k, i in enumerate(grad_positions):
                g = None if found is None else found[k]
                if i in lists:
                    flat.extend(g if g is not None else [None] * ctx.kdfast_list_lengths[i])
                else:
                    flat.append(g)
            return tuple(flat)

        self.custom_op.register_autograd(input_grads, setup_context=setup)
        self._eager = _eager_function(self.fn, setup, eager_grads)

    def __call__(self, *args):
        if traced(args):
            return self.custom_op(*args)
        if self._eager is None:
            return self.fn(*args)
        # Autograd tracks the inputs that receive a gradient (tensor lists spliced in); the
        # function gets the arguments as they are.
        tracked = []
        for i in self._grads:
            if i in self._lists:
                tracked.extend(args[i])
            else:
                tracked.append(args[i])
        return self._eager.apply(args, *tracked)


def fused_op(name: str, grads: Sequence[str] = (), mutates_args: Sequence[str] = ()) -> Callable[[Callable], FusedOp]:
    """Define a kdfast op from its function (type-annotated: the schema is inferred)."""
    return lambda fn: FusedOp(name, fn, grads, mutates_args)


def _eager_function(fn: Callable, setup: Callable, eager_grads: Callable):
    """The op as a plain autograd.Function: the same function, setup and backward."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, args, *tracked):
            output = fn(*args)
            setup(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return eager_grads(ctx, *grads)

    Eager.__name__ = Eager.__qualname__ = f"{fn.__name__}_eager"
    return Eager
