"""The distillation losses, with fasterai's call convention and numbers.

Every loss is called as ``loss(pred=, teacher_pred=, fm_s=, fm_t=, target=, **kwargs)``
and ignores what it does not use: output losses compare ``pred`` with ``teacher_pred``,
intermediate ones sum over the pairs of hooked activations ``zip(fm_s, fm_t)`` (dicts
layer name -> tensor, paired in order). Three equivalent ways to set a loss's options::

    SoftTarget(pred=s, teacher_pred=t, T=3)       # fasterai's call: returns the loss
    functools.partial(SoftTarget, T=3)            # fasterai's configuration
    kd = SoftTarget(T=3); kd(pred=s, teacher_pred=t)   # a configured nn.Module

RKD and PKT (documented by fasterai, never shipped) use the canonical definitions; with no
hooked layers they compare ``pred`` and ``teacher_pred`` (e.g. embeddings).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks as checks
from . import functional as KF
from ._dtypes import acc_dtype

__all__ = ["DistillationLoss", "SoftTarget", "Logits", "Mutual", "DecoupledKD", "ReverseKL", "JSD", "TVD",
           "Attention", "ActivationBoundaries", "FitNet", "Similarity", "RKD", "PKT"]

_INPUTS = frozenset({"pred", "teacher_pred", "fm_s", "fm_t", "target"})


class DistillationLoss(nn.Module):
    """Base of kdfast's losses: called with inputs it computes the loss (fasterai's function
    convention); called with settings only it returns a configured module."""

    def __new__(cls, *args, **kwargs):
        if not args and _INPUTS.isdisjoint(kwargs):
            return super().__new__(cls)  # SoftTarget(T=3): configure
        settings = inspect.signature(cls.__init__).parameters
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in settings and k != "self"}
        return cls(**options)(*args, **kwargs)  # SoftTarget(pred=..., teacher_pred=..., T=3)

    def __init__(self):
        super().__init__()

    def extra_repr(self) -> str:
        names = [k for k in inspect.signature(type(self).__init__).parameters if k != "self"]
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in names)

    @staticmethod
    def _need_logits(pred, teacher_pred, name):
        if pred is None or teacher_pred is None:
            raise ValueError(f"{name} compares the model outputs: pass pred= and teacher_pred=")


class SoftTarget(DistillationLoss):
    """Hinton et al.: ``KLDiv(batchmean)(log_softmax(s/T), softmax(t/T)) · T²`` over dim 1."""

    def __init__(self, T: float = 5):
        super().__init__()
        self.T = checks.check_temperature(T, "SoftTarget")

    def forward(self, pred=None, teacher_pred=None, **kwargs):
        self._need_logits(pred, teacher_pred, "SoftTarget")
        return KF.soft_target_kl(pred, teacher_pred, T=self.T, dim=1)


class Logits(DistillationLoss):
    """Direct logit matching: ``mse_loss(s, t)``."""

    def forward(self, pred=None, teacher_pred=None, **kwargs):
        self._need_logits(pred, teacher_pred, "Logits")
        checks.check_pair(pred, teacher_pred, "Logits", "pred", "teacher_pred")
        return F.mse_loss(pred, teacher_pred.detach())


class Mutual(DistillationLoss):
    """``KLDiv(batchmean)(log_softmax(s), softmax(t))``: SoftTarget at T=1."""

    def forward(self, pred=None, teacher_pred=None, **kwargs):
        self._need_logits(pred, teacher_pred, "Mutual")
        return KF.soft_target_kl(pred, teacher_pred, T=1.0, dim=1)


class DecoupledKD(DistillationLoss):
    """Decoupled KD (Zhao et al. 2022): ``(alpha·TCKD + beta·NCKD)·T²``; needs ``target``."""

    def __init__(self, T: float = 4, alpha: float = 1.0, beta: float = 8.0, normalize: bool = False):
        super().__init__()
        self.T = checks.check_temperature(T, "DecoupledKD")
        checks.check_weight(alpha, "alpha", "DecoupledKD"), checks.check_weight(beta, "beta", "DecoupledKD")
        self.alpha, self.beta = alpha, beta  # as given (the repr); checked here to fail early
        self.normalize = normalize

    def forward(self, pred=None, teacher_pred=None, target=None, **kwargs):
        self._need_logits(pred, teacher_pred, "DecoupledKD")
        return KF.decoupled_kd(pred, teacher_pred, target, T=self.T, alpha=self.alpha, beta=self.beta,
                               normalize=self.normalize, dim=1)


class _TokenDivergence(DistillationLoss):
    """A divergence of the student's softmax from the teacher's over the class dim ``dim``
    (default -1: [B, C] logits and [B, L, V] token logits alike), batchmean; with ``target``
    (the callback passes the batch's labels), rows labelled ``ignore_index`` are left out and
    the mean is over the rows kept. ``teacher_pred`` may be a ``kdfast.TopK``."""

    def __init__(self, T: float = 1.0, dim: int = -1, ignore_index: int = -100, tail: str = "bucket"):
        super().__init__()
        self.T = checks.check_temperature(T, type(self).__name__)
        self.dim, self.ignore_index, self.tail = dim, ignore_index, tail

    def _loss(self, pred, teacher_pred, target):
        raise NotImplementedError

    def forward(self, pred=None, teacher_pred=None, target=None, **kwargs):
        self._need_logits(pred, teacher_pred, type(self).__name__)
        if isinstance(target, torch.Tensor) and (target.is_floating_point() or target.dim() == pred.dim()):
            target = None  # soft or one-hot targets: no labels that could leave rows out
        return self._loss(pred, teacher_pred, target)


class ReverseKL(_TokenDivergence):
    """Reverse KL ``T² · KL(p_s ‖ p_t)`` (MiniLLM; TRL's DistillationTrainer default)."""

    def _loss(self, pred, teacher_pred, target):
        return KF.reverse_kl(pred, teacher_pred, T=self.T, dim=self.dim, target=target,
                             ignore_index=self.ignore_index, tail=self.tail)


class JSD(_TokenDivergence):
    """Generalized JSD ``T² · [beta·KL(p_t ‖ m) + (1 - beta)·KL(p_s ‖ m)]``, ``m = beta·p_t +
    (1 - beta)·p_s`` (GKD; beta = 0 forward KL, 1 reverse KL, as TRL)."""

    def __init__(self, beta: float = 0.5, T: float = 1.0, dim: int = -1, ignore_index: int = -100,
                 tail: str = "bucket"):
        super().__init__(T, dim, ignore_index, tail)
        self.beta = checks.check_beta(beta, "JSD")

    def _loss(self, pred, teacher_pred, target):
        return KF.jsd(pred, teacher_pred, beta=self.beta, T=self.T, dim=self.dim, target=target,
                      ignore_index=self.ignore_index, tail=self.tail)


class TVD(_TokenDivergence):
    """Total variation ``T · ½ sum |p_t - p_s|`` (T = 1: the plain TVD)."""

    def _loss(self, pred, teacher_pred, target):
        return KF.tvd(pred, teacher_pred, T=self.T, dim=self.dim, target=target, ignore_index=self.ignore_index,
                      tail=self.tail)


def _sum_pairs(fm_s, fm_t, name, pair_loss):
    total = 0.0
    for _, f_s, _, f_t in checks.check_layer_dicts(fm_s, fm_t, name):
        total = total + pair_loss(f_s, f_t)
    return total


class Attention(DistillationLoss):
    """Attention transfer (Zagoruyko & Komodakis): per pair ``mse(a_s, a_t)`` with
    ``a = normalize(f.pow(p).mean(1))`` over the spatial positions; summed over pairs (all
    pairs in one fused call). ``pool=True`` average-pools the larger map of a pair to the
    smaller one's spatial size instead of raising when they differ."""

    def __init__(self, p: float = 2, pool: bool = False):
        super().__init__()
        checks.check_power(p, "Attention")
        self.p, self.pool = p, pool

    def forward(self, fm_s=None, fm_t=None, **kwargs):
        pairs = [(f"fm_s[{ks!r}]", s, f"fm_t[{kt!r}]", t)
                 for ks, s, kt, t in checks.check_layer_dicts(fm_s, fm_t, "Attention")]
        return KF._attention_transfer_layers(pairs, self.p, self.pool, "Attention")


class ActivationBoundaries(DistillationLoss):
    """Heo et al.: ``((s+m)²·[s>-m & t<=0] + (s-m)²·[s<=m & t>0]).mean()`` per pair."""

    def __init__(self, m: float = 2):
        super().__init__()
        checks.check_weight(m, "m", "ActivationBoundaries", " (the margin)")
        self.m = m

    def _pair(self, s, t):
        checks.check_pair(s, t, "ActivationBoundaries", "fm_s", "fm_t")
        t = t.detach()
        m = self.m
        positive = (s + m).pow(2) * ((s > -m) & (t <= 0)).to(s.dtype)
        negative = (s - m).pow(2) * ((s <= m) & (t > 0)).to(s.dtype)
        return (positive + negative).mean(dtype=acc_dtype(s.dtype))

    def forward(self, fm_s=None, fm_t=None, **kwargs):
        return _sum_pairs(fm_s, fm_t, "ActivationBoundaries", self._pair)


class FitNet(DistillationLoss):
    """FitNets (Romero et al.): ``mse_loss(f_s, f_t)`` per pair (shapes must match)."""

    @staticmethod
    def _pair(s, t):
        checks.check_pair(s, t, "FitNet", "fm_s", "fm_t")
        return (s - t.detach()).pow(2).mean(dtype=acc_dtype(s.dtype))  # mse_loss, accumulated in fp32

    def forward(self, fm_s=None, fm_t=None, **kwargs):
        return _sum_pairs(fm_s, fm_t, "FitNet", self._pair)


class Similarity(DistillationLoss):
    """Similarity preserving (Tung & Mori): MSE of the row-normalised Gram matrices."""

    def __init__(self, p: float = 2):
        super().__init__()
        checks.check_power(p, "Similarity", " (the norm of the Gram rows)")
        self.p = p

    def forward(self, fm_s=None, fm_t=None, pred=None, **kwargs):
        return _sum_pairs(fm_s, fm_t, "Similarity", lambda s, t: KF.similarity_preserving(s, t, self.p))


def _relational_pairs(fm_s, fm_t, pred, teacher_pred, name):
    """Hooked layer pairs, or the outputs when no layer is hooked."""
    if not fm_s and not fm_t and pred is not None and teacher_pred is not None:
        return [(pred, teacher_pred)]
    return [(s, t) for _, s, _, t in checks.check_layer_dicts(fm_s, fm_t, name)]


class RKD(DistillationLoss):
    """Relational KD (Park et al. 2019): ``dist_weight·L_distance + angle_weight·L_angle`` on
    flattened features, summed over pairs, both terms from one Gram matrix per model and layer
    pair. Defaults 25 and 50 (the paper, RepDistiller, mdistiller on CIFAR; torchdistill's
    ImageNet config uses 1 and 2)."""

    def __init__(self, dist_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__()
        checks.check_weight(dist_weight, "dist_weight", "RKD"), checks.check_weight(angle_weight, "angle_weight", "RKD")
        self.dist_weight, self.angle_weight = dist_weight, angle_weight

    def forward(self, fm_s=None, fm_t=None, pred=None, teacher_pred=None, **kwargs):
        total = 0.0
        for s, t in _relational_pairs(fm_s, fm_t, pred, teacher_pred, "RKD"):
            if self.dist_weight or self.angle_weight:
                total = total + KF.rkd(s, t, self.dist_weight, self.angle_weight)
        return total


class PKT(DistillationLoss):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018) on flattened features, summed
    over pairs (configs commonly weight it ×30000)."""

    def __init__(self, eps: float = 1e-7):
        super().__init__()
        checks.check_weight(eps, "eps", "PKT")
        self.eps = eps

    def forward(self, fm_s=None, fm_t=None, pred=None, teacher_pred=None, **kwargs):
        total = 0.0
        for s, t in _relational_pairs(fm_s, fm_t, pred, teacher_pred, "PKT"):
            total = total + KF.pkt(s, t, self.eps)
        return total
