"""Attention transfer forward + backward against fasterai's eager Attention formula and
torch.compile of it, for one layer pair and for a resnet-like set of three pairs (cases
with floors), and a sweep of the batch size for one layer pair."""
from __future__ import annotations

import torch

from .harness import Case, Floor, Roofline, Steadiness, fwd_bwd, kdfast_backends
from .peers import fasterai_attention

import kdfast
from kdfast.functional import attention_transfer
from kdfast.ops.attention import KERNELS


def _inputs(batch, pairs, dtype, device, seed=0):
    """Student maps (requiring grad) and teacher maps; pairs: (C_s, C_t, H)."""
    g = torch.Generator(device=device).manual_seed(seed)
    fs = [torch.randn(batch, cs, h, h, device=device, generator=g).to(dtype).requires_grad_() for cs, _, h in pairs]
    ft = [torch.randn(batch, ct, h, h, device=device, generator=g).to(dtype) for _, ct, h in pairs]
    return fs, ft


def _providers(batch, pairs, dtype, device):
    def eager():
        return fwd_bwd(fasterai_attention, *_inputs(batch, pairs, dtype, device))

    def compiled():
        return fwd_bwd(torch.compile(fasterai_attention), *_inputs(batch, pairs, dtype, device))

    def kdfast_backend(name):
        def build():
            def loss(fs, ft):
                with kdfast.use_backend(name):
                    return attention_transfer(fs, ft)
            return fwd_bwd(loss, *_inputs(batch, pairs, dtype, device))
        return build

    providers = {"fasterai-eager": eager, "torch-compile": compiled}
    for name in kdfast_backends(KERNELS, device):
        providers[f"kdfast-{name}"] = kdfast_backend(name)
    return providers


def _min_bytes(batch, pairs, element_size, student_reads=1):
    """Read f_s, read f_t, write grad_f_s. ``student_reads=2``: forward and backward as the two
    passes autograd runs, the forward reading f_s and f_t, the backward f_s again (the CPU
    floor's count: 84 MB at B = 64, 256/512 channels, 16×16); 1: one pass (the GPU floor's)."""
    return sum(batch * ((1 + student_reads) * cs + ct) * h * h for cs, ct, h in pairs) * element_size


def _shape(batch, pairs):
    shape = {"B": batch}
    for i, (cs, ct, h) in enumerate(pairs, 1):
        suffix = str(i) if len(pairs) > 1 else ""
        shape.update({f"Cs{suffix}": cs, f"Ct{suffix}": ct, f"H{suffix}": h, f"W{suffix}": h})
    return shape


def sweep(device: str, quick: bool) -> list[Case]:
    """One layer pair (256 student / 512 teacher channels), batch sizes doubling."""
    if device == "cpu":
        dtype, pair, batches = torch.float32, (256, 512, 16), [4, 16] if quick else [4, 8, 16, 32, 64, 128]
    else:
        dtype, pair, batches = torch.bfloat16, (256, 512, 56), [16, 64] if quick else [16, 32, 64, 128, 256, 512]
    size = torch.empty((), dtype=dtype).element_size()
    return [Case("attention_transfer", _shape(b, [pair]), dtype, device, _providers(b, [pair], dtype, device),
                 min_bytes=_min_bytes(b, [pair], size, student_reads=2 if device == "cpu" else 1),
                 sweep="B", note="size sweep")
            for b in batches]


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        dtype = torch.float32
        batch, pair = (16, (256, 512, 16)) if quick else (64, (256, 512, 16))
        resnet = [(64, 256, 32), (128, 512, 16), (256, 1024, 8)]  # ResNet-18-like vs ResNet-50-like stages
        resnet_batch = 8 if quick else 32
        return [
            Case("attention_transfer", _shape(batch, [pair]), dtype, device, _providers(batch, [pair], dtype, device),
                 min_bytes=_min_bytes(batch, [pair], 4, student_reads=2),
                 floors=[Floor("kdfast-cpu", "fasterai-eager", 3.0), Floor("kdfast-cpu", "torch-compile", 1.3)],
                 steadiness=Steadiness(["kdfast-cpu"], 2**26 if quick else 2**28),
                 roofline=Roofline("kdfast-cpu", within=None, copy_fraction=0.8)),
            Case("attention_transfer", _shape(resnet_batch, resnet), dtype, device,
                 _providers(resnet_batch, resnet, dtype, device),
                 min_bytes=_min_bytes(resnet_batch, resnet, 4, student_reads=2),
                 note="resnet-like set of three layer pairs in one call (report only)"),
        ]
    dtype = torch.bfloat16
    batch, pair = (32, (256, 512, 56)) if quick else (256, (256, 512, 56))
    best = ("kdfast-cuda", "kdfast-triton")
    return [Case("attention_transfer", _shape(batch, [pair]), dtype, device, _providers(batch, [pair], dtype, device),
                 min_bytes=_min_bytes(batch, [pair], 2),
                 gbps_floors={p: 0.7 * 4300.0 for p in best})]
