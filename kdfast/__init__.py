"""kdfast: fast knowledge distillation for PyTorch and fastai.

fasterai's distillation API (losses, KnowledgeDistillationCallback, match_feature_layers,
schedules) as a drop-in, on fused C++ / Triton / CUDA kernels with pure-PyTorch fallbacks.

    import kdfast
    loss = kdfast.functional.soft_target_kl(student_logits, teacher_logits, T=4)
    loss = kdfast.functional.jsd(student_logits, kdfast.topk_logits(teacher_logits, k=64))
    kdfast.info()                      # versions, build, and every backend's status
    with kdfast.use_backend("torch"):  # force a backend
        ...

The fastai layer lives in ``kdfast.fastai`` (``from kdfast.all import *``).
"""
__version__ = "0.1.0"

from . import functional, losses
from ._backend import BACKENDS, BackendUnavailable, current_backend, use_backend
from .info import info
from .topk import TopK, topk_logits

__all__ = ["functional", "losses", "TopK", "topk_logits", "use_backend", "current_backend", "BackendUnavailable",
           "BACKENDS", "info", "__version__"]
