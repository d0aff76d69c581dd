"""Verified first use of the GPU kernels, and the tolerances kdfast's kernels are held to.

A CUDA or Triton kernel path without a validation record for this GPU and these sources
(kdfast/_validation.py) is checked the first time a process calls it for an (op, backend,
dtype, kernel path): the op runs again on a small slice of the same inputs (a few rows
or samples, the same class count or spatial size), once on that backend and once on the
float64 torch reference, and the loss and the input gradient must agree within the
tolerances below, the ones the tests use. A mismatch, an error at launch, or a
non-finite result where the reference is finite gives one warning, and ``auto`` uses the
next backend (cuda > triton > torch) for that key for the rest of the process.
After a key's first call the check costs a dictionary lookup; there is none for kernels
with a valid record, for a forced backend (``kdfast.use_backend``, ``KDFAST_BACKEND``),
for calls traced by torch.compile, or under ``KDFAST_VERIFY=never``.

``KDFAST_VERIFY``: ``auto`` (default: check kernels without a valid record), ``always``
(check every GPU kernel on first use), ``never``.

The ops hook in through ``first_use``, which gives ``_backend.select_backend`` a check.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence

import torch

from . import _validation

MODES = ("auto", "always", "never")
GPU_BACKENDS = _validation.GPU_BACKENDS

# Largest error allowed against the float64 reference, relative to the reference's largest
# magnitude: fp32 accumulation everywhere, so the output's own rounding dominates
# (bfloat16 keeps 8 bits of mantissa, float16 11).
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-6,
    torch.bfloat16: 8e-3,
    torch.float16: 1e-3,
}
LOSS_TOLERANCE = {  # losses are accumulated and returned in fp32 whatever the input dtype
    torch.float64: 1e-10,
    torch.float32: 2e-6,
    torch.bfloat16: 2e-6,
    torch.float16: 2e-6,
}
# The relational losses are fp32 sums of terms much larger than their total (PKT's KL of
# two close distributions loses ~8 bits at B = 2): ~2^-14 rather than fp32's 2^-23, and
# errors count as absolute below 1e-6 (RKD at B = 2 is 0 up to rounding).
RELATIONAL_LOSS_TOLERANCE = {torch.float64: 1e-10, torch.float32: 5e-5, torch.bfloat16: 5e-5, torch.float16: 5e-5}
RELATIONAL_FLOOR = 1e-6

# Verification holds a kernel to this many times the tests' tolerance (or the error of the
# reference run in the input's own precision, when larger): it tells a broken kernel
# (errors near 1) or one that lost float64 precision (1e-9 for a tolerance of 1e-10) from
# rounding, without warning on a user's data that the tests never saw.
MARGIN = 4.0
ROWS = 4         # rows (softmax-KL) a verification slice keeps
SAMPLES = 2      # samples (attention transfer)
RELATIONAL_SAMPLES = 24  # samples (relational losses: their [B, B] stages)
GRAD_OUTPUT = 1.7  # not 1: the saved gradients are scaled in backward


def tolerances(family: str, dtype: torch.dtype) -> tuple[float, float, float]:
    """(loss tolerance, gradient tolerance, floor): see compare()."""
    if family == "relational":
        return RELATIONAL_LOSS_TOLERANCE[dtype], TOLERANCE[dtype], RELATIONAL_FLOOR
    return LOSS_TOLERANCE[dtype], TOLERANCE[dtype], 1e-30


def compare(actual: torch.Tensor, expected: torch.Tensor, tol: float, floor: float = 1e-30) -> str | None:
    """None when max |actual - expected| <= tol * max(|expected|, floor) (compared in float64,
    non-finite entries equal), else what differs."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    finite = torch.isfinite(expected)
    if not torch.equal(finite, torch.isfinite(actual)):
        return f"non-finite entries differ ({int((~torch.isfinite(actual)).sum())} non-finite, reference " \
               f"{int((~finite).sum())})"
    if not torch.equal(actual[~finite].nan_to_num(0), expected[~finite].nan_to_num(0)):
        return "infinite entries differ"
    if finite.any():
        scale = expected[finite].abs().max().clamp_min(floor)
        err = (actual[finite] - expected[finite]).abs().max()
        if not err <= tol * scale:
            return f"max error {err:.3g} > {tol:g} x {scale:.3g}"
    return None


def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    finite = torch.isfinite(expected) & torch.isfinite(actual)
    if not finite.any():
        return 0.0
    scale = expected[finite].abs().max().clamp_min(floor)
    return float((actual[finite] - expected[finite]).abs().max() / scale)


def mode() -> str:
    value = os.environ.get("KDFAST_VERIFY", "auto") or "auto"
    if value not in MODES:
        raise ValueError(f"kdfast: KDFAST_VERIFY={value!r}; choose one of {', '.join(MODES)}")
    return value


class _State:
    results: dict[tuple, bool] = {}         # (op, backend, dtype, path) -> passed
    validated: dict[tuple, bool] = {}       # (family, backend, device) -> a valid record exists


def reset() -> None:
    """Forget every check and record lookup of this process (tests)."""
    _State.results.clear()
    _State.validated.clear()


def capability(device: torch.device) -> str | None:
    """The compute capability of a CUDA device ('9.0'), None for other devices."""
    if device.type != "cuda":
        return None
    return ".".join(map(str, torch.cuda.get_device_capability(device)))


def _has_record(family: str, backend: str, device: torch.device) -> bool:
    key = (family, backend, device)
    known = _State.validated.get(key)
    if known is None:
        cap = capability(device)
        known = _State.validated[key] = cap is not None and _validation.matching(family, backend, cap) is not None
    return known


class Slice:
    """An op's call on a slice of its inputs: ``call(*inputs)`` returns the loss; the
    gradient is taken with respect to ``inputs[:n_grad]``."""

    def __init__(self, call: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], n_grad: int):
        self.call, self.inputs, self.n_grad = call, list(inputs), n_grad

    def run(self, backend: str, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Loss and input gradients on ``backend``, the inputs converted to ``dtype``; with
        gradients, outside autocast and inference mode, whatever the caller's context."""
        from ._backend import use_backend

        device = self.inputs[0].device.type
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device, enabled=False), \
                use_backend(backend):
            xs = [x.detach().to(dtype if x.is_floating_point() and dtype else x.dtype, copy=True)
                  for x in self.inputs]  # copies: also of inference tensors
            grads_of = [x.requires_grad_() for x in xs[:self.n_grad]]
            loss = self.call(*xs)
            grads = torch.autograd.grad(loss.sum() * GRAD_OUTPUT, grads_of, allow_unused=True)
        return loss.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(grads_of, grads)]

    def shapes(self) -> str:
        return ", ".join(str(list(x.shape)) for x in self.inputs)


def check_slice(family: str, backend: str, trial: Slice) -> str | None:
    """None when ``backend`` agrees with the float64 reference on the slice, else what was seen."""
    try:
        loss, grads = trial.run(backend)
        if loss.is_cuda:
            torch.cuda.synchronize(loss.device)  # a launch error shows here, not later
    except Exception as e:  # noqa: BLE001 - any failure of the kernel is the finding
        return f"{type(e).__name__}: {str(e).strip()[:300]}"
    try:
        ref_loss, ref_grads = trial.run("torch", torch.float64)
        own_loss, own_grads = trial.run("torch")  # the reference in the inputs' own precision
    except Exception:  # noqa: BLE001 - no reference to check against: nothing is found
        return None
    dtype = trial.inputs[0].dtype
    loss_tol, grad_tol, floor = tolerances(family, dtype)
    loss_tol = MARGIN * max(loss_tol, relative_error(own_loss, ref_loss, floor))
    problem = compare(loss, ref_loss, loss_tol, floor)
    if problem:
        return f"loss: {problem}"
    for i, (grad, ref, own) in enumerate(zip(grads, ref_grads, own_grads)):
        tol = MARGIN * max(grad_tol, relative_error(own, ref, floor))
        problem = compare(grad, ref, tol, floor)
        if problem:
            return f"gradient of input {i}: {problem}"
    return None


def first_use(family: str, op: str, device: torch.device, dtype: torch.dtype,
              path: Callable[[str], str], trial: Callable[[], Slice]) -> Callable[[str], bool]:
    """A check for ``_backend.select_backend``: whether auto may run this call on ``backend``.

    ``path(backend)``: the kernel path the call takes there (cheap); ``trial()``: the op on
    a slice of the call's inputs (built only when a check runs).
    """
    def check(backend: str) -> bool:
        if backend not in GPU_BACKENDS or torch.compiler.is_compiling():
            return True
        setting = mode()
        if setting == "never" or (setting == "auto" and _has_record(family, backend, device)):
            return True
        key = (op, backend, dtype, path(backend))
        passed = _State.results.get(key)
        if passed is None:
            passed = _State.results[key] = _check(family, key, trial())
        return passed
    return check


def _check(family: str, key: tuple, trial: Slice) -> bool:
    op, backend, dtype, path = key
    problem = check_slice(family, backend, trial)
    if problem is None:
        return True
    warnings.warn(
        f"kdfast: the {backend} kernel of {op} ({str(dtype).replace('torch.', '')}, kernel path {path}) does not "
        f"match the PyTorch reference on a slice of this call's inputs ({trial.shapes()}): {problem}. kdfast "
        f"runs this op on the next backend for these inputs for the rest of this process. Please report it "
        f"with this message and the output of `kdfast info` (set KDFAST_VERIFY=never to skip these checks, "
        f"or force a backend with kdfast.use_backend).", RuntimeWarning, stacklevel=4)
    return False
