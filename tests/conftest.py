"""Test setup: Triton runs interpreted on the CPU when there is no GPU (set before any
import of triton), an inductor cache per version of kdfast's ops, and the backend reset
around every test. The helpers tests share are in helpers.py."""
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


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"kdfast-inductor-{_ops_digest()}"))

import pytest  # noqa: E402

import kdfast  # noqa: E402

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
