"""The LLM divergences, forward + backward: JSD (beta = 0.5), reverse KL and TVD against
their eager formulas (TRL's generalized_jsd_loss for JSD; kdfast/bench/peers.py) and
torch.compile of them; a top-k teacher (k = 64) against the dense teacher; on a GPU also
Liger-Kernel's LigerJSD (on log-softmax outputs) where importable."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .harness import Case, Floor, StoredRatio, fwd_bwd, kdfast_backends
from .peers import eager_reverse_kl, eager_tvd, trl_generalized_jsd_loss

import kdfast
from kdfast import functional as KF
from kdfast.ops.softmax_kl import KERNELS

T = 1.0  # TRL's default (its temperature has no T², kdfast's T² is 1 at T = 1: the same loss)
K = 64


def _inputs(n, v, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    s = (torch.randn(n, v, device=device, dtype=torch.float32, generator=g) * 4).to(dtype).requires_grad_()
    t = (torch.randn(n, v, device=device, dtype=torch.float32, generator=g) * 4).to(dtype)
    return s, t


def _providers(n, v, dtype, device, peer, kdfast_loss, liger_beta=None):
    """The peer's eager formula, torch.compile of it, kdfast on every backend here, and
    (GPU) Liger's JSD with this beta."""
    def eager():
        s, t = _inputs(n, v, dtype, device)
        return fwd_bwd(peer, s, t)

    def compiled():
        s, t = _inputs(n, v, dtype, device)
        return fwd_bwd(torch.compile(peer), s, t)

    def kdfast_backend(name):
        def build():
            s, t = _inputs(n, v, dtype, device)

            def loss(s, t):
                with kdfast.use_backend(name):
                    return kdfast_loss(s, t)
            return fwd_bwd(loss, s, t)
        return build

    providers = {"eager": eager, "torch-compile": compiled}
    for name in kdfast_backends(KERNELS, device):
        providers[f"kdfast-{name}"] = kdfast_backend(name)
    if device == "cuda" and liger_beta is not None:
        try:
            from liger_kernel.transformers import LigerJSD
        except ImportError:
            pass
        else:
            liger = LigerJSD(beta=liger_beta)

            def liger_provider():
                s, t = _inputs(n, v, dtype, device)

                def loss(s, t):  # Liger takes log-probabilities (and has no temperature)
                    return liger(F.log_softmax(s.float(), dim=-1), F.log_softmax(t.float(), dim=-1))
                return fwd_bwd(loss, s, t)
            providers["liger-jsd"] = liger_provider
    return providers


def _topk_providers(n, v, dtype, device):
    def dense(name):
        def build():
            s, t = _inputs(n, v, dtype, device)

            def loss(s, t):
                with kdfast.use_backend(name):
                    return KF.soft_target_kl(s, t)
            return fwd_bwd(loss, s, t)
        return build

    def sparse(name):
        def build():
            s, t = _inputs(n, v, dtype, device)
            topk = kdfast.topk_logits(t, K)  # stored once (offline in practice), not timed

            def loss(s, indices):
                with kdfast.use_backend(name):
                    return KF.soft_target_kl(s, kdfast.TopK(indices, topk.logprobs))
            return fwd_bwd(loss, s, topk.indices)
        return build

    providers = {}
    for name in kdfast_backends(KERNELS, device, with_torch=False):
        providers[f"kdfast-{name}-dense"] = dense(name)
        providers[f"kdfast-{name}-top{K}"] = sparse(name)
    return providers


def _teacher_bytes(n, v, dtype):
    dense = n * v * torch.empty((), dtype=dtype).element_size()
    sparse = n * K * (4 + 4)  # topk_logits: int32 indices, float32 log-probabilities
    return dense, sparse


def cases(device: str, quick: bool) -> list[Case]:
    beta = 0.5
    jsd_peer = lambda s, t: trl_generalized_jsd_loss(s, t, beta=beta, temperature=T)  # noqa: E731
    if device == "cpu":
        n, v = (256, 8000) if quick else (2048, 32000)
        dtype, best, floors, gbps = torch.float32, ["kdfast-cpu"], [("eager", 4.0), ("torch-compile", 1.5)], {}
    else:
        n, v = (1024, 32000) if quick else (8192, 128256)
        dtype, best = torch.bfloat16, ["kdfast-cuda", "kdfast-triton"]
        floors, gbps = [("torch-compile", 1.0), ("liger-jsd", 1.0)], {p: 3000.0 for p in best}
    size = dtype.itemsize
    out = []
    for op, peer, loss, liger_beta in (
            ("jsd", jsd_peer, lambda s, t: KF.jsd(s, t, beta=beta, T=T), beta),
            ("reverse_kl", lambda s, t: eager_reverse_kl(s, t, T), lambda s, t: KF.reverse_kl(s, t, T=T), 1.0),
            ("tvd", lambda s, t: eager_tvd(s, t, T), lambda s, t: KF.tvd(s, t, T=T), None)):
        case_floors = [Floor(p, b, x) for p in best for b, x in floors if b != "liger-jsd" or liger_beta is not None]
        out.append(Case(op, {"N": n, "V": v}, dtype, device, _providers(n, v, dtype, device, peer, loss, liger_beta),
                        min_bytes=3 * n * v * size, floors=case_floors, gbps_floors=dict(gbps),
                        note="eager: TRL's generalized_jsd_loss" if op == "jsd" else ""))
    dense_bytes, sparse_bytes = _teacher_bytes(n, v, dtype)
    backend = best[0].removeprefix("kdfast-")
    out.append(Case(f"soft_target_kl top-{K} teacher", {"N": n, "V": v, "k": K}, dtype, device,
                    _topk_providers(n, v, dtype, device), interleave=True,  # a ratio of two fast calls: in turns
                    floors=[Floor(f"kdfast-{backend}-top{K}", f"kdfast-{backend}-dense", 1.5)],
                    stored_ratios=[StoredRatio("teacher", f"kdfast-{backend}-top{K}", sparse_bytes,
                                               f"kdfast-{backend}-dense", dense_bytes, 100.0)],
                    note="tail='bucket'; the teacher stored as kdfast.topk_logits makes it (int32 indices, "
                         "float32 log-probabilities) against its dense logits"))
    return out
