"""Fused linear distillation, forward + backward from the LM heads' inputs: kdfast's
``fused_linear_kd`` against the materialised eager path (logits -> log_softmax -> divergence,
autograd through the heads), TRL 1.16's ``_chunked_divergence_loss`` and Liger-Kernel's
``LigerFusedLinearJSDLoss`` (``compiled=False``, and ``compiled=True`` where torch.compile
runs it), at JSD (beta = 0.5) and forward KL (beta = 0 in TRL and Liger), T = 1, no hard
loss, every token kept. Peers run where importable. The gradients of the student's hidden
states and head weight are timed and their peak extra memory counted (the weight gradient
included: every provider writes one).

CPU: float32, N = 2048 tokens, V = 32000, H = 256 (the teacher as wide). GPU: bfloat16,
N = 16384, V = 128256, H = 4096 (a Llama-3 vocabulary and width).
"""
from __future__ import annotations

import torch

from .harness import Case, Floor, MemoryRatio, fwd_bwd, kdfast_backends
from .peers import trl_generalized_jsd_loss

import kdfast
from kdfast import functional as KF
from kdfast.ops.fused_linear import KERNELS


# (warmup, repeat): a call takes seconds on a 2-core CPU (four N x V x H matmuls, and the
# eager path's and the peers' elementwise passes); medians of 5, the providers timed in
# turns (calls of seconds on a shared machine: load changes between providers otherwise).
REPEATS = {"cpu": (1, 5), "cuda": (3, 15)}


def _inputs(n, v, h, dtype, device, seed=0):
    """Student hidden states and head (with gradients), teacher hidden states and head."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

    hs, ws = randn(n, h).requires_grad_(), randn(v, h, scale=h ** -0.5 * 4).requires_grad_()
    ht, wt = randn(n, h), randn(v, h, scale=h ** -0.5 * 4)
    return hs, ws, ht, wt


def eager_loss(beta):
    """The materialised path: both heads' logits [N, V] (the teacher's under no_grad), TRL's
    generalized_jsd_loss (log_softmax of both, the divergence; beta = 0: forward KL), mean
    over the tokens."""
    def loss(student, ht, wt):
        hs, ws = student
        with torch.no_grad():
            t = ht @ wt.t()
        return trl_generalized_jsd_loss(hs @ ws.t(), t, beta=beta)
    return loss


def kdfast_loss(beta, backend):
    def loss(student, ht, wt):
        hs, ws = student
        with kdfast.use_backend(backend):
            return KF.fused_linear_kd(hs, ws, (ht, wt), divergence="jsd", beta=beta)
    return loss


def trl_loss(beta):
    """TRL 1.16's DistillationTrainer loss (JSD(beta), beta = 0 forward KL; no T²: at T = 1
    the same as kdfast's)."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    def loss(student, ht, wt):
        hs, ws = student
        mask = torch.ones(1, hs.shape[0], dtype=torch.long, device=hs.device)
        return _chunked_divergence_loss(hs[None], ht[None], ws, wt, mask, beta)[0]
    return loss


def liger_loss(beta, compiled):
    """Liger-Kernel 0.8.5's chunked JSD (beta = 0: forward KL), soft loss only."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    module = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=compiled)

    def loss(student, ht, wt):
        hs, ws = student
        labels = torch.zeros(hs.shape[0], dtype=torch.long, device=hs.device)
        return module(hs, ws, ht, wt, labels)
    return loss


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def _providers(n, v, h, dtype, device, beta):
    def provider(make_loss):
        def build():
            hs, ws, ht, wt = _inputs(n, v, h, dtype, device)
            return fwd_bwd(make_loss(), [hs, ws], ht, wt)
        return build

    providers = {"eager": provider(lambda: eager_loss(beta))}
    for name in kdfast_backends(KERNELS, device, with_torch=False):  # (the torch backend: chunks by autograd)
        providers[f"kdfast-{name}"] = provider(lambda name=name: kdfast_loss(beta, name))
    if _importable("trl"):
        providers["trl-chunked"] = provider(lambda: trl_loss(beta))
    if _importable("liger_kernel"):
        providers["liger"] = provider(lambda: liger_loss(beta, compiled=False))
        providers["liger-compiled"] = provider(lambda: liger_loss(beta, compiled=True))
    return providers


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        n, v, h = (256, 4000, 64) if quick else (2048, 32000, 256)
        dtype, best = torch.float32, "kdfast-cpu"
    else:
        n, v, h = (1024, 32000, 1024) if quick else (16384, 128256, 4096)
        dtype, best = torch.bfloat16, "kdfast-cuda"
    out = []
    for op, beta in (("fused_linear jsd", 0.5), ("fused_linear forward_kl", 0.0)):
        providers = _providers(n, v, h, dtype, device, beta)
        floors = [Floor(best, "eager", 1.0)]
        memory = [MemoryRatio(best, "eager", 0.10)]
        for peer in ("trl-chunked", "liger", "liger-compiled"):
            if peer in providers:
                floors.append(Floor(best, peer, 1.2))
                memory.append(MemoryRatio(best, peer, 1.0))
        out.append(Case(op, {"N": n, "V": v, "H": h}, dtype, device, providers, floors=floors, memory_ratios=memory,
                        repeats=REPEATS[device], interleave=True,
                        note=f"beta={beta} (0: forward KL), T=1, student and teacher heads, gradients of the "
                             f"student's hidden states and head weight; eager: logits materialised, TRL's "
                             f"generalized_jsd_loss"))
    return out
