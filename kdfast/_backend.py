"""Backends and how kdfast picks one for each call.

``torch``  the pure-PyTorch reference of each op: any device, always available.
``cpu``    fused C++ kernels (kdfast._C) for CPU tensors.
``cuda``   fused CUDA kernels (kdfast._C built with nvcc) for CUDA tensors.
``triton`` fused Triton kernels for CUDA tensors (and CPU tensors under
           ``TRITON_INTERPRET=1``, which is how they are tested without a GPU).
``auto``   (default) the fastest backend available for the tensors' device.

Force one with ``kdfast.use_backend(name)`` (also a context manager) or the environment
variable ``KDFAST_BACKEND``, read when kdfast is imported. Forcing a backend that cannot
run a call raises :class:`BackendUnavailable` saying why.

The choice is process-wide, not per thread: every thread sees the backend the last
``use_backend`` set, and a ``with`` block restores, on exit, the choice in force when it
was entered, in every thread. Set it once (e.g. before starting worker threads); blocks
that overlap in time in different threads undo each other.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Collection

import torch

from . import _extension

BACKENDS = ("torch", "cpu", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS

# auto's order of preference per device type; the torch reference always closes the list.
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

# Devices a backend can run on.
BACKEND_DEVICES = {"cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda", "cpu")}


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this call."""


def _triton_status() -> tuple[str | None, bool]:
    """(why Triton is unusable or None, whether it runs interpreted on the CPU)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})", False
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if interpret or torch.cuda.is_available():
        return None, interpret
    return "no CUDA GPU (set TRITON_INTERPRET=1 before importing kdfast to run Triton kernels on the CPU)", False


def _platform_reasons() -> dict[str, str | None]:
    """Why each backend is unusable on this machine (None: usable)."""
    cuda_gpu = torch.cuda.is_available()
    if not _extension.LOADED:
        cpu = cuda = _extension.LOAD_ERROR
    else:
        cpu = None
        if not _extension.WITH_CUDA:
            cuda = "kdfast._C was built without CUDA kernels (torch without CUDA, no nvcc, or KDFAST_NO_CUDA=1)"
        elif not cuda_gpu:
            cuda = "no CUDA GPU available"
        else:
            cuda = None
    return {"torch": None, "cpu": cpu, "triton": TRITON_REASON, "cuda": cuda}


TRITON_REASON, TRITON_INTERPRETED = _triton_status()
PLATFORM_REASONS = _platform_reasons()


def _check_choice(name: str, source: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"kdfast: unknown backend {name!r} from {source}; choose one of {', '.join(CHOICES)}")
    return name


class _State:
    # The env var is checked lazily (at the first kdfast call) so a bad value gives a clear
    # error there instead of breaking `import kdfast`.
    forced: str = os.environ.get("KDFAST_BACKEND", "auto") or "auto"
    source: str = "the KDFAST_BACKEND environment variable"


def current_backend() -> str:
    """The backend in force: 'auto' or one of BACKENDS."""
    return _check_choice(_State.forced, _State.source)


class use_backend:
    """Force a backend for kdfast's ops, globally or within a ``with`` block.

    >>> kdfast.use_backend("cpu")            # from now on
    >>> with kdfast.use_backend("torch"):    # only inside the block
    ...     loss = kdfast.functional.soft_target_kl(s, t, T=4)

    Process-wide: other threads see the backend it sets, also during a ``with`` block.
    """

    def __init__(self, name: str):
        self._previous = (_State.forced, _State.source)
        _State.forced, _State.source = _check_choice(name, "use_backend()"), "use_backend()"

    def __enter__(self) -> "use_backend":
        return self

    def __exit__(self, *exc) -> None:
        _State.forced, _State.source = self._previous


def unavailable_reason(backend: str, device: torch.device | str, kernels: Collection[str]) -> str | None:
    """Why ``backend`` cannot run an op with these kernels on this device, or None."""
    device_type = torch.device(device).type
    if backend not in kernels:
        return f"this op has no {backend} kernel (it has: {', '.join(sorted(kernels))})"
    if backend == "torch":
        return None
    if PLATFORM_REASONS[backend] is not None:
        return PLATFORM_REASONS[backend]
    if device_type not in BACKEND_DEVICES[backend]:
        return f"the {backend} backend does not run on {device_type} tensors"
    if backend == "triton" and device_type == "cpu" and not TRITON_INTERPRETED:
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return None


def select_backend(op: str, kernels: Collection[str], device: torch.device,
                   check: Callable[[str], bool] | None = None) -> str:
    """The backend that runs ``op`` on ``device``: the forced one, or auto's choice: the
    first available one that passes ``check`` (verified first use, kdfast/_verify.py)."""
    forced = current_backend()
    if forced == "auto":
        for backend in AUTO_ORDER.get(device.type, ("torch",)):
            if unavailable_reason(backend, device, kernels) is None and (check is None or check(backend)):
                return backend
        return "torch"
    reason = unavailable_reason(forced, device, kernels)
    if reason is not None:
        raise BackendUnavailable(
            f"kdfast: backend {forced!r} (forced by {_State.source}) cannot run {op} on {device.type} "
            f"tensors: {reason}. Use kdfast.use_backend('auto') to let kdfast choose.")
    return forced
