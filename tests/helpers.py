"""Helpers shared by kdfast's tests: the tolerance table, the backends to test, float64
comparisons and the torch.compile check. (pytest puts tests/ on sys.path: ``from helpers
import ...``.)"""
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kdfast
from kdfast import _backend

# The tolerances the kernels are held to, shared with kdfast's verified first use.
from kdfast._verify import LOSS_TOLERANCE, TOLERANCE, compare  # noqa: E402,F401

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def kernel_backends(device: str, kernels) -> list[str]:
    """The non-reference backends that can run these kernels on this device here."""
    return [b for b in ("cpu", "triton", "cuda")
            if _backend.unavailable_reason(b, device, kernels) is None]


def backend_params(kernels) -> list:
    """(device, backend) parameters for every device here and every non-reference backend
    with these kernels; CUDA ones marked ``gpu``."""
    return [pytest.param(device, b, marks=[pytest.mark.gpu] if device == "cuda" else [], id=f"{device}-{b}")
            for device in DEVICES for b in kernel_backends(device, kernels)]


def make_logits(shape, dtype=torch.float32, device="cpu", layout="contiguous", scale=3.0, seed=0) -> torch.Tensor:
    """Random logits in the given memory layout (values do not depend on the layout):
    "contiguous", "strided" (every other element of a larger tensor along the last dim) or
    "permuted" (the dims' memory order reversed)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    if layout == "strided":
        big = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=dtype)
        big[..., ::2] = x
        x = big[..., ::2]
    elif layout == "permuted":
        x = x.permute(*reversed(range(x.dim()))).contiguous().permute(*reversed(range(x.dim())))
    return x.to(device)


class NewTensorSpy(TorchDispatchMode):
    """Records the ops that create a tensor of at least `min_numel` elements."""

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel, self.created = min_numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor) and a.numel() > 0}
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.numel() >= self.min_numel and o.data_ptr() not in inputs:
                self.created.append((str(func), tuple(o.shape)))
        return out


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


def write_digit_images(folder, names):
    """Small real images (scikit-learn's digits) under the given file names."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    images = load_digits().images
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray((images[i] * 15).astype(np.uint8), mode="L").save(folder / name)
    return folder


def offline_tutorial_env(tmp_path) -> dict:
    """The environment in which fasterai's tutorial runs offline: untar_data(URLs.PETS)
    finds a local oxford-iiit-pet folder (24 small images, cats named with a capital as in
    PETS), torchvision finds resnet34 weights in its cache (random ones, saved there), and
    kdfast is this checkout's."""
    from torchvision.models import ResNet34_Weights, resnet34

    home = tmp_path / "fastai_home"
    names = [f"{'Persian' if i % 2 else 'beagle'}_{i}.png" for i in range(24)]
    write_digit_images(home / "data" / "oxford-iiit-pet" / "images", names)
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    torch.save(resnet34().state_dict(), checkpoints / os.path.basename(ResNet34_Weights.IMAGENET1K_V1.url))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "FASTAI_HOME": str(home), "TORCH_HOME": str(tmp_path / "torch_home"),
            "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONWARNINGS": "ignore"}
