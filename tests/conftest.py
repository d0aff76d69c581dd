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
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def kernel_backends(device: str, kernels) -> list[str]:
    """The non-reference backends that can run these kernels on this device here."""
    return [b for b in ("cpu", "triton", "cuda")
            if _backend.unavailable_reason(b, device, kernels) is None]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "",
                 floor: float = 1e-30) -> None:
    """max |actual - expected| <= tol * max(|expected|, floor), compared in float64.

    ``floor``: the scale below which errors count as absolute, for values that are 0 up to
    rounding (e.g. RKD at a batch of 2)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(actual)), f"{what}: non-finite entries differ"
    assert torch.equal(actual[~finite].nan_to_num(0), expected[~finite].nan_to_num(0)), \
        f"{what}: infinite entries differ"
    if finite.any():
        scale = expected[finite].abs().max().clamp_min(floor)
        err = (actual[finite] - expected[finite]).abs().max()
        assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}"


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


@pytest.fixture(autouse=True)
def _auto_backend():
    """Every test starts and ends with the backend on auto."""
    with kdfast.use_backend("auto"):
        yield
