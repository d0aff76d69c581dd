"""Relational losses (RKD distance + angle, PKT, similarity preserving) forward + backward:
the canonical eager implementations (bench/peers.py) side by side with kdfast's backends (one Gram matrix
per model and fused kernels) and, on the CPU, torch.compile of the eager code.

The canonical codes: RKD as lenscloth/RKD and RepDistiller write it (the [B, B, D] tensor
of normalised differences), PKT as RepDistiller, similarity as fasterai 0.4.1's formula.
kdfast's torch backend is the same RKD formula as the canonical one, so it is not timed.
"""
from __future__ import annotations

import torch

from .harness import Case, Floor, MemoryRatio, fwd_bwd, kdfast_backends
from .peers import canonical_pkt, canonical_rkd, fasterai_similarity

import kdfast
from kdfast import functional as KF
from kdfast.ops.relational import KERNELS


def _inputs(b, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    s = torch.randn(b, d, device=device, dtype=torch.float32, generator=g).to(dtype).requires_grad_()
    t = torch.randn(b, d, device=device, dtype=torch.float32, generator=g).to(dtype)
    return s, t


def _providers(eager_name, eager, kdfast_fn, b, d, dtype, device, compiled, eager_up_to=None):
    def build(fn):
        def provider():
            s, t = _inputs(b, d, dtype, device)
            return fwd_bwd(fn, s, t)
        return provider

    providers = {}
    if eager_up_to is None or b <= eager_up_to:  # the canonical RKD's [B, B, D] tensors
        providers[eager_name] = build(eager)
        if compiled:
            providers["torch-compile"] = build(torch.compile(eager))
    for name in kdfast_backends(KERNELS, device, with_torch=False):
        def loss(s, t, name=name):
            with kdfast.use_backend(name):
                return kdfast_fn(s, t)
        providers[f"kdfast-{name}"] = build(loss)
    return providers


LOSSES = [  # op, eager provider's name, eager formula, kdfast function
    ("rkd", "canonical-eager", canonical_rkd, lambda s, t: KF.rkd(s, t, 25.0, 50.0)),
    ("pkt", "canonical-eager", canonical_pkt, KF.pkt),
    ("similarity_preserving", "fasterai-eager", fasterai_similarity, KF.similarity_preserving),
]


def sweep(device: str, quick: bool) -> list[Case]:
    """RKD (distance + angle) over batch sizes: B x B Grams and a B^3 angle term; the
    canonical code's [B, B, D] tensors limit it to the smaller batches."""
    if device == "cpu":
        d, dtype, eager_up_to = 1024, torch.float32, 256
        batches = [16, 64] if quick else [16, 32, 64, 128, 256, 512]
    else:
        d, dtype, eager_up_to = 4096, torch.bfloat16, 512
        batches = [128, 512] if quick else [128, 256, 512, 1024, 2048, 4096]
    op, eager_name, eager, kdfast_fn = LOSSES[0]
    size = torch.empty((), dtype=dtype).element_size()
    return [Case(op, {"B": b, "D": d}, dtype, device,
                 _providers(eager_name, eager, kdfast_fn, b, d, dtype, device, compiled=device == "cpu",
                            eager_up_to=eager_up_to),
                 min_bytes=3 * b * d * size, sweep="B", note="size sweep (read e_s, e_t, write the gradient)")
            for b in batches]


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        (b, d), dtype = (32, 256) if quick else (128, 2048), torch.float32
        floors = {"rkd": 50.0, "pkt": 2.0, "similarity_preserving": 2.0}
        best = ["kdfast-cpu"]
    else:
        (b, d), dtype = (256, 1024) if quick else (1024, 4096), torch.bfloat16
        floors = {"rkd": 100.0}
        best = ["kdfast-cuda", "kdfast-triton"]
    out = []
    for op, eager_name, eager, kdfast_fn in LOSSES:
        # torch.compile of the eager code: a peer on the CPU; on the GPU its compile time
        # does not fit the short validation run.
        providers = _providers(eager_name, eager, kdfast_fn, b, d, dtype, device, compiled=device == "cpu")
        out.append(Case(
            op, {"B": b, "D": d}, dtype, device, providers,
            floors=[Floor(p, eager_name, floors[op]) for p in best] if op in floors else [],
            memory_ratios=[MemoryRatio(p, eager_name, 0.05) for p in best] if op == "rkd" and device == "cpu" else [],
            note="forward + backward; Gram matrices of student and teacher, fused epilogue, one backward matmul"))
    return out
