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

@pytest.fixture(autouse=True)
def _auto_backend():
    """Every test starts and ends with the backend on auto."""
    with kdfast.use_backend("auto"):
        yield
