"""Relational losses (RKD distance + angle, PKT, similarity preserving) forward + backward:
the canonical eager implementations side by side with kdfast's backends (one Gram matrix
per model and fused kernels) and, on the CPU, torch.compile of the eager code.

The canonical codes: RKD as lenscloth/RKD and RepDistiller write it (the [B, B, D] tensor
of normalised differences), PKT as RepDistiller, similarity as fasterai 0.4.1's formula.
kdfast's torch backend is the same RKD formula as the canonical one, so it is not timed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.harness import Case, Floor, MemoryRatio, fwd_bwd

import kdfast
from kdfast import _backend
from kdfast import functional as KF
from kdfast.ops.relational import KERNELS


def canonical_pdist(e, squared=False, eps=1e-12):
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
    if not squared:
        res = res.sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def canonical_rkd(student, teacher, dist_ratio=25.0, angle_ratio=50.0):
    """RKD distance + angle as lenscloth/RKD and RepDistiller compute it."""
    with torch.no_grad():
        t_d = canonical_pdist(teacher)
        t_d = t_d / t_d[t_d > 0].mean()
    d = canonical_pdist(student)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    with torch.no_grad():
        td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = student.unsqueeze(0) - student.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    loss_a = F.smooth_l1_loss(s_angle, t_angle)
    return dist_ratio * loss_d + angle_ratio * loss_a


def canonical_pkt(output_net, target_net, eps=1e-7):
    """PKT as RepDistiller computes it."""
    output_net_norm = torch.sqrt(torch.sum(output_net ** 2, dim=1, keepdim=True))
    output_net = output_net / (output_net_norm + eps)
    output_net[output_net != output_net] = 0
    target_net_norm = torch.sqrt(torch.sum(target_net ** 2, dim=1, keepdim=True))
    target_net = target_net / (target_net_norm + eps)
    target_net[target_net != target_net] = 0
    model_similarity = torch.mm(output_net, output_net.transpose(0, 1))
    target_similarity = torch.mm(target_net, target_net.transpose(0, 1))
    model_similarity = (model_similarity + 1.0) / 2.0
    target_similarity = (target_similarity + 1.0) / 2.0
    model_similarity = model_similarity / torch.sum(model_similarity, dim=1, keepdim=True)
    target_similarity = target_similarity / torch.sum(target_similarity, dim=1, keepdim=True)
    return torch.mean(target_similarity * torch.log((target_similarity + eps) / (model_similarity + eps)))


def fasterai_similarity(student_flat, teacher_flat, p=2):
    """fasterai 0.4.1's Similarity for one layer pair."""
    student_sim = F.normalize(student_flat @ student_flat.t(), p=p, dim=1)
    teacher_sim = F.normalize(teacher_flat @ teacher_flat.t(), p=p, dim=1)
    return F.mse_loss(student_sim, teacher_sim)


def _inputs(b, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    s = torch.randn(b, d, device=device, dtype=torch.float32, generator=g).to(dtype).requires_grad_()
    t = torch.randn(b, d, device=device, dtype=torch.float32, generator=g).to(dtype)
    return s, t


def _providers(eager_name, eager, kdfast_fn, b, d, dtype, device, compiled):
    def build(fn):
        def provider():
            s, t = _inputs(b, d, dtype, device)
            return fwd_bwd(fn, s, t)
        return provider

    providers = {eager_name: build(eager)}
    if compiled:
        providers["torch-compile"] = build(torch.compile(eager))
    for name in _backend.BACKENDS[1:]:
        if _backend.unavailable_reason(name, device, KERNELS) is None and not (name == "triton" and device == "cpu"):
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
