"""Test setup: Triton runs interpreted on the CPU when there is no GPU (set before any
import of triton), an inductor cache per version of kdfast's ops, and helpers shared by
the kernel tests."""
import hashlib
import os
import pathlib
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _ops_digest() -> str:
    """A hash of kdfast's op definitions. Inductor's graph cache does not notice a changed
    fake kernel (e.g. an op output's new shape) and would replay the old graph."""
    package = pathlib.Path(__file__).resolve().parent.parent / "kdfast"
    digest = hashlib.sha256()
    for path in sorted([*package.glob("ops/*.py"), *package.glob("triton/*.py")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"kdfast-inductor-{_ops_digest()}"))

import pytest  # noqa: E402

import kdfast  # noqa: E402
from kdfast import _backend  # noqa: E402

# The tolerances the kernels are held to, shared with kdfast's verified first use.
from kdfast._verify import LOSS_TOLERANCE, TOLERANCE, compare  # noqa: E402,F401

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def kernel_backends(device: str, kernels) -> list[str]:
    """The non-reference backends that can run these kernels on this device here."""
    return [b for b in ("cpu", "triton", "cuda")
            if _backend.unavailable_reason(b, device, kernels) is None]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "",
                 floor: float = 1e-30) -> None:
    """max |actual - expected| <= tol * max(|expected|, floor), compared in float64, with the
    same non-finite entries (kdfast._verify.compare).

    ``floor``: the scale below which errors count as absolute, for values that are 0 up to
    rounding (e.g. RKD at a batch of 2)."""
    problem = compare(actual, expected, tol, floor)
    assert problem is None, f"{what}: {problem}"


def assert_compiled_matches_eager(loss_fn, students: list, others: list, backend: str, tol: float = 1e-6) -> None:
    """``loss_fn(*students, *others)`` and its gradients w.r.t. the students are the same
    eager and under ``torch.compile(fullgraph=True)`` (no graph break) on this backend."""
    def loss_and_grads(fn):
        loss = fn(*students, *others)
        return loss.detach(), torch.autograd.grad(loss, students)

    torch._dynamo.reset()
    with kdfast.use_backend(backend):
        eager = loss_and_grads(loss_fn)
        compiled = loss_and_grads(torch.compile(loss_fn, fullgraph=True))
    assert_close(compiled[0], eager[0], tol, "loss")
    for c, e in zip(compiled[1], eager[1]):
        assert_close(c, e, tol, "grad")


def pytest_addoption(parser):
    parser.addoption("--kdfast-backend", help="run only the tests of this backend (the `backend` parameter "
                     "of parametrized tests; `make gpu-check` runs each family and backend in a process)")
    parser.addoption("--kdfast-first", type=int, help="run only the first N selected tests (gpu-check's dry run)")


@pytest.hookimpl(trylast=True)  # after -m and -k
def pytest_collection_modifyitems(config, items):
    backend, first = config.getoption("--kdfast-backend"), config.getoption("--kdfast-first")
    keep = items
    if backend:
        keep = [item for item in keep if getattr(item, "callspec", None) is not None
                and item.callspec.params.get("backend") == backend]
    if first is not None:
        keep = keep[:first]
    if len(keep) < len(items):
        kept = set(map(id, keep))
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
        items[:] = keep


@pytest.fixture(autouse=True, scope="session")
def _triton_launches_as_on_a_gpu():
    """Interpreted Triton kernels get their float arguments as fp32 and a GPU's grid
    limits, as a real launch (tests/triton_launch.py)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        yield
        return
    pytest.importorskip("triton")
    from triton_launch import launch_semantics
    with launch_semantics():
        yield


@pytest.fixture(autouse=True)
def _auto_backend():
    """Every test starts and ends with the backend on auto."""
    with kdfast.use_backend("auto"):
        yield
