"""Fused softmax-KL (SoftTarget) forward + backward against fasterai's eager formula,
torch.compile of it, and Liger-Kernel where importable: one case with floors, and a sweep
of the vocabulary size V from 1k to 256k."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .harness import Case, Floor, Roofline, Steadiness, fwd_bwd, kdfast_backends
from .peers import fasterai_soft_target

import kdfast
from kdfast.functional import soft_target_kl
from kdfast.ops.softmax_kl import KERNELS


def _inputs(n, v, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    s = (torch.randn(n, v, device=device, dtype=torch.float32, generator=g) * 4).to(dtype).requires_grad_()
    t = (torch.randn(n, v, device=device, dtype=torch.float32, generator=g) * 4).to(dtype)
    return s, t


def _providers(n, v, dtype, device, T):
    def eager():
        s, t = _inputs(n, v, dtype, device)
        return fwd_bwd(fasterai_soft_target, s, t, T)

    def compiled():
        s, t = _inputs(n, v, dtype, device)
        return fwd_bwd(torch.compile(fasterai_soft_target), s, t, T)

    def kdfast_backend(name):
        def build():
            s, t = _inputs(n, v, dtype, device)

            def loss(s, t):
                with kdfast.use_backend(name):
                    return soft_target_kl(s, t, T=T)
            return fwd_bwd(loss, s, t)
        return build

    providers = {"fasterai-eager": eager, "torch-compile": compiled}
    for name in kdfast_backends(KERNELS, device):
        providers[f"kdfast-{name}"] = kdfast_backend(name)
    if device == "cuda":
        try:
            from liger_kernel.transformers import LigerKLDIVLoss
        except ImportError:
            pass
        else:
            liger = LigerKLDIVLoss(reduction="batchmean")

            def liger_provider():
                s, t = _inputs(n, v, dtype, device)

                def loss(s, t):  # Liger takes log-probabilities and has no temperature
                    return liger(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1)) * (T * T)
                return fwd_bwd(loss, s, t)
            providers["liger-kl-div"] = liger_provider
    return providers


def _min_bytes(n, v, dtype):
    """Read s, read t, write the gradient."""
    return 3 * n * v * torch.empty((), dtype=dtype).element_size()


def sweep(device: str, quick: bool) -> list[Case]:
    """V from 1k to 256k classes (16k and 64k on a quick run), a fixed number of rows."""
    T = 4.0
    n, dtype = (256, torch.float32) if device == "cpu" else (2048, torch.bfloat16)
    sizes = [2**k for k in (range(10, 17, 2) if quick else range(10, 19))]
    if quick:
        n = n // 4
    return [Case("soft_target_kl", {"N": n, "V": v}, dtype, device, _providers(n, v, dtype, device, T),
                 min_bytes=_min_bytes(n, v, dtype), sweep="V", note="size sweep")
            for v in sizes]


def cases(device: str, quick: bool) -> list[Case]:
    T = 4.0
    if device == "cpu":
        n, v = (256, 8000) if quick else (2048, 32000)
        dtype = torch.float32
        # Steadiness: a 1.25 GB temporary is what fasterai's eager formula allocates at this size.
        # Floors: read s, read t, write grad at the copy rate; two exponentials per element
        # (softmax of the student and of the teacher: each needed elementwise for the gradient).
        return [Case("soft_target_kl", {"N": n, "V": v}, dtype, device, _providers(n, v, dtype, device, T),
                     min_bytes=_min_bytes(n, v, dtype),
                     floors=[Floor("kdfast-cpu", "fasterai-eager", 4.0), Floor("kdfast-cpu", "torch-compile", 1.5)],
                     steadiness=Steadiness(["kdfast-cpu"], (2**26 if quick else 1_250_000_000), fresh_bytes=n * v * 4),
                     roofline=Roofline("kdfast-cpu", exps=2 * n * v, within=1.5))]
    n, v = (1024, 32000) if quick else (8192, 128256)
    dtype = torch.bfloat16
    grad_bytes = n * v * 2
    best = [p for p in ("kdfast-cuda", "kdfast-triton")]
    return [Case("soft_target_kl", {"N": n, "V": v}, dtype, device, _providers(n, v, dtype, device, T),
                 min_bytes=_min_bytes(n, v, dtype),
                 floors=[Floor(p, b, 1.5) for p in best for b in ("torch-compile", "liger-kl-div")],
                 gbps_floors={p: 3000.0 for p in best},
                 memory_ceilings={p: int(grad_bytes + 0.01 * 3 * grad_bytes) for p in best})]
