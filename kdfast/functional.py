"""Tensor-level distillation ops, each on the fastest backend available (see kdfast._backend).

Teacher inputs never receive gradient. Inputs may be float16, bfloat16, float32 or
float64; kdfast accumulates in float32 (float64 for float64) and returns losses in that
dtype.

NaN and Inf: a NaN anywhere in a row gives a NaN loss (rows ignored through
``ignore_index`` excepted: they add exactly 0 and get a zero gradient). A ``-inf`` logit
is a class of probability 0: where the teacher's is 0 it adds nothing, where only the
student's is 0 the KL is ``+inf``. A ``+inf`` logit has no softmax: NaN.
"""
from __future__ import annotations

import torch

from . import _checks as checks
from .ops import attention as _attention
from .ops import fused_linear as _fused_linear
from .ops import relational as _relational
from .ops.softmax_kl import DIVERGENCES, softmax_kl_loss, softmax_kl_topk_loss
from .topk import TopK

__all__ = [
    "soft_target_kl", "reverse_kl", "jsd", "tvd", "fused_linear_kd", "decoupled_kd", "attention_transfer",
    "rkd", "rkd_distance", "rkd_angle", "pkt", "similarity_preserving",
]


def _softmax_divergence(op, student_logits, teacher_logits, divergence, beta, T, reduction, dim, target,
                        ignore_index, tail, weight=1.0, divisor=None):
    """Validate, then run the dense or the sparse-teacher op."""
    if divergence == "jsd" and beta in (0.0, 1.0):  # TRL's ends: exactly forward / reverse KL
        divergence = "forward_kl" if beta == 0 else "reverse_kl"
    dim = checks.check_dim(checks.check_tensor(student_logits, "student_logits", op), dim, op, "student_logits")
    T = checks.check_temperature(T, op)
    checks.check_reduction(reduction, op)
    if isinstance(teacher_logits, TopK):
        indices, logprobs = checks.check_topk(teacher_logits, student_logits, dim, op)
        tail = checks.check_tail(tail, T, op)
        target = checks.check_target(target, student_logits, dim, op, ignore_index, student_logits.shape[dim])
        return softmax_kl_topk_loss(student_logits, indices, logprobs, T=T, reduction=reduction, dim=dim,
                                    target=target, ignore_index=ignore_index, divergence=divergence, jsd_beta=beta,
                                    tail=tail, weight=weight, divisor=divisor, op=op)
    if isinstance(teacher_logits, tuple) and len(teacher_logits) == 2:
        raise TypeError(f"{op}: teacher_logits is a plain tuple; a sparse teacher is passed as "
                        f"kdfast.TopK(indices, logprobs)")
    checks.check_pair(student_logits, teacher_logits, op, "student_logits", "teacher_logits")
    target = checks.check_target(target, student_logits, dim, op, ignore_index, student_logits.shape[dim])
    return softmax_kl_loss(student_logits, teacher_logits, T=T, reduction=reduction, dim=dim, target=target,
                           ignore_index=ignore_index, divergence=divergence, jsd_beta=beta, weight=weight,
                           divisor=divisor, op=op)


_COMMON_DOC = """
    teacher_logits: logits like the student's, or a sparse teacher ``kdfast.TopK(indices,
    logprobs)`` (see ``kdfast.topk_logits``) with ``tail``: 'bucket' (default; the classes
    outside the top-k are one more class, the teacher's missing mass ``1 - sum_K p`` against
    the student's own; needs T = 1, the tail's mass at another temperature being unknown) or
    'renormalize' (both distributions restricted to the top-k and renormalised; any T, the
    stored log-probabilities re-tempered exactly over the top-k; the student's other classes
    get gradient 0).

    reduction: 'batchmean' (default) divides the sum by the size of dim 0 as torch's
    KLDivLoss does; 'mean' by the number of rows; 'sum'; 'none' gives one loss per row (the
    shape without ``dim``). With ``target`` (class indices, one per row: the labels), rows
    whose target is ``ignore_index`` are left out and 'batchmean' / 'mean' divide by the
    rows kept (token-level LLM distillation); all rows ignored gives 0.
"""


def soft_target_kl(student_logits: torch.Tensor, teacher_logits, T: float = 1.0,
                   reduction: str = "batchmean", dim: int = -1, target: torch.Tensor | None = None,
                   ignore_index: int = -100, tail: str = "bucket") -> torch.Tensor:
    """Forward KL: ``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` over the class dim ``dim``.

    fasterai's SoftTarget (batchmean over dim 0, also for [B, C, H, W] logits with dim=1).
    """
    return _softmax_divergence("soft_target_kl", student_logits, teacher_logits, "forward_kl", 0.5, T, reduction,
                               dim, target, ignore_index, tail)


def reverse_kl(student_logits: torch.Tensor, teacher_logits, T: float = 1.0, reduction: str = "batchmean",
               dim: int = -1, target: torch.Tensor | None = None, ignore_index: int = -100,
               tail: str = "bucket") -> torch.Tensor:
    """Reverse KL: ``T² · KL(softmax(student/T) ‖ softmax(teacher/T))``, the student's
    distribution first (mode-seeking: MiniLLM, TRL's DistillationTrainer default).
    """
    return _softmax_divergence("reverse_kl", student_logits, teacher_logits, "reverse_kl", 0.5, T, reduction, dim,
                               target, ignore_index, tail)


def jsd(student_logits: torch.Tensor, teacher_logits, beta: float = 0.5, T: float = 1.0,
        reduction: str = "batchmean", dim: int = -1, target: torch.Tensor | None = None, ignore_index: int = -100,
        tail: str = "bucket") -> torch.Tensor:
    """Generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024; TRL's definition):
    ``T² · [beta·KL(p_t ‖ m) + (1 - beta)·KL(p_s ‖ m)]``, ``m = beta·p_t + (1 - beta)·p_s``,
    with p_t, p_s the teacher's and the student's softmax at T; log m is computed in log space.

    beta = 0 is forward KL and beta = 1 reverse KL, exactly (TRL). Inside (0, 1) the value
    tends to beta·KL(p_t ‖ p_s) as beta -> 0 and to (1 - beta)·KL(p_s ‖ p_t) as beta -> 1, so
    it jumps at both ends (TRL #6780). beta = 0.5 is the symmetric JSD (at most log 2).
    """
    beta = checks.check_beta(beta, "jsd")
    return _softmax_divergence("jsd", student_logits, teacher_logits, "jsd", beta, T, reduction, dim, target,
                               ignore_index, tail)


def tvd(student_logits: torch.Tensor, teacher_logits, T: float = 1.0, reduction: str = "batchmean", dim: int = -1,
        target: torch.Tensor | None = None, ignore_index: int = -100, tail: str = "bucket") -> torch.Tensor:
    """Total variation distance: ``T · ½ sum |softmax(teacher/T) - softmax(student/T)|``.

    T = 1 (the default) is the plain TVD in [0, 1] (Liger-Kernel, DistillKit, DistiLLM have
    no temperature). The factor T plays the role of the KLs' T²: as T grows both softmaxes
    flatten towards uniform, ``p - q ≈ (z_t - z_s - mean)/(T·V)``, so TVD and its gradient
    shrink like 1/T; times T, the loss and its gradient keep their size at any T.
    """
    return _softmax_divergence("tvd", student_logits, teacher_logits, "tvd", 0.5, T, reduction, dim, target,
                               ignore_index, tail)


for _fn in (soft_target_kl, reverse_kl, jsd, tvd):
    _fn.__doc__ += _COMMON_DOC


def fused_linear_kd(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher, target=None,
                    divergence: str = "forward_kl", beta: float = 0.5, T: float = 1.0, soft_weight: float = 1.0,
                    hard_weight: float = 0.0, ignore_index: int = -100, student_bias: torch.Tensor | None = None,
                    reduction: str = "mean", chunk_size: int | None = None, return_parts: bool = False,
                    tail: str = "bucket"):
    """LLM distillation from the LM heads' inputs: ``soft_weight · KD + hard_weight · CE``,
    the [tokens, vocab] logits never materialised.

    student_hidden: [N, H] or [B, S, H], the student's final hidden states (the input of its
    LM head); student_weight: [V, H] (``lm_head.weight``), student_bias: [V] or None.
    teacher: ``(teacher_hidden, teacher_weight)`` or ``(teacher_hidden, teacher_weight,
    teacher_bias)`` with the teacher's own width H_t (its hidden states shaped like the
    student's but for the width), the teacher's logits [..., V], or a ``kdfast.TopK``
    ([..., k], with ``tail`` as in :func:`jsd`). The teacher never receives gradient (its
    logits are computed under no_grad); gradients reach student_hidden, student_weight and
    student_bias.

    KD is ``divergence`` ('forward_kl', 'reverse_kl', 'jsd' with ``beta``, 'tvd') at
    temperature T, scaled as :func:`soft_target_kl`, :func:`jsd`, ... scale it (T², T for
    TVD); CE is the cross-entropy of the student's logits (at T = 1) against ``target``.
    Both are summed over the tokens whose target is not ``ignore_index`` (every token without
    a target; hard_weight > 0 needs one) and divided by their count ('mean', 0 when every
    token is ignored) or not ('sum').

    Computed a chunk of ``chunk_size`` rows at a time (default: rows such that one float32
    [rows, V] tile is about 32 MiB on the CPU, 1/128 of the GPU's memory within [256 MiB,
    1 GiB] on a GPU; kdfast.ops.fused_linear.default_chunk_size), with the gradients in the
    forward pass: extra memory O(chunk·V + V·H) whatever N. The logits, the divergence and
    the gradients are in float32 (float64 for float64); the weight gradient of bfloat16 /
    float16 weights is accumulated in float32 over the chunks and rounded once.

    Returns the loss (float32, float64 for float64 inputs), or with ``return_parts`` the
    tuple ``(loss, kd, ce)`` of the loss and its two unweighted terms (detached, for
    logging; a term of weight 0 is then computed too, without gradient).
    """
    op = "fused_linear_kd"
    h, teacher_args, target, T, soft_weight, hard_weight, tail = checks.check_fused_linear(
        student_hidden, student_weight, student_bias, teacher, target, divergence, T, soft_weight, hard_weight,
        reduction, chunk_size, tail, ignore_index, DIVERGENCES, op)
    beta = checks.check_beta(beta, op)
    if divergence == "jsd" and beta in (0.0, 1.0):  # TRL's ends: exactly forward / reverse KL
        divergence = "forward_kl" if beta == 0 else "reverse_kl"
    loss, kd, ce = _fused_linear.fused_linear_kd_loss(
        h, student_weight, student_bias, teacher_args, target, divergence=divergence, beta=beta, T=T,
        soft_weight=soft_weight, hard_weight=hard_weight, ignore_index=ignore_index, tail=tail, reduction=reduction,
        chunk_size=chunk_size, parts=bool(return_parts), op=op)
    return (loss, kd, ce) if return_parts else loss


def decoupled_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                 T: float = 4.0, alpha: float = 1.0, beta: float = 8.0, normalize: bool = False,
                 reduction: str = "batchmean", dim: int = -1, ignore_index: int = -100) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022) as fasterai computes it: ``T² (alpha·TCKD + beta·NCKD)``.

    TCKD compares the binary [target class, rest] probabilities, NCKD the distributions over
    the non-target classes. ``normalize`` picks fasterai's two NCKD forms, which agree unless
    logits differ by ~1000·T (the fused kernels compute the exact non-target softmax).
    Rows whose target is ``ignore_index`` are left out, as in :func:`soft_target_kl`.
    """
    op = "decoupled_kd"
    checks.check_pair(student_logits, teacher_logits, op, "student_logits", "teacher_logits")
    dim = checks.check_dim(student_logits, dim, op, "student_logits")
    num_classes = checks.check_decoupled(student_logits, target, dim, op)
    T = checks.check_temperature(T, op)
    checks.check_reduction(reduction, op)
    target = checks.check_target(target, student_logits, dim, op, ignore_index, num_classes)
    alpha, beta = checks.check_weight(alpha, "alpha", op), checks.check_weight(beta, "beta", op)
    return softmax_kl_loss(student_logits, teacher_logits, T=T, reduction=reduction, dim=dim, target=target,
                           ignore_index=ignore_index, decoupled=True, alpha=alpha, beta=beta,
                           normalize=bool(normalize), op=op)


def attention_transfer(f_s, f_t, p: float = 2, pool: bool = False) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis) as fasterai computes it: per layer pair,
    ``a(f) = normalize(mean_c f^p)`` over the spatial positions and the mean over (batch,
    positions) of ``(a_s - a_t)²``; summed over pairs.

    f_s, f_t: feature maps [B, C, H, W] (or [B, C, *spatial]), or equally long lists of them,
    paired in order (all pairs go to the fused kernels in one call). Channel counts may
    differ; spatial sizes must match unless ``pool=True``, which average-pools the larger map
    to the smaller one's size (adaptive average pooling, as RepDistiller does).
    """
    op = "attention_transfer"
    return _attention_transfer_layers(checks.check_map_lists(f_s, f_t, op), p, pool, op)


def _attention_transfer_layers(pairs, p: float, pool: bool, op: str) -> torch.Tensor:
    """attention_transfer over named pairs ``(name_s, f_s, name_t, f_t)`` (names for errors)."""
    p = checks.check_power(p, op)
    matched = [_attention.pool_to_match(s, t) if checks.check_feature_maps(ns, s, nt, t, pool, op) else (s, t)
               for ns, s, nt, t in pairs]
    return _attention.attention_transfer_pairs(matched, p, op)


def rkd(e_s: torch.Tensor, e_t: torch.Tensor, dist_weight: float = 25.0,
        angle_weight: float = 50.0) -> torch.Tensor:
    """Relational KD (Park et al. 2019): ``dist_weight·L_distance + angle_weight·L_angle`` on
    embeddings [B, ...] (flattened; student and teacher widths may differ), both terms from
    one Gram matrix per model. A term of weight 0 is not computed."""
    checks.check_embeddings(e_s, e_t, "rkd")
    return _relational.rkd_loss(e_s, e_t, checks.check_weight(dist_weight, "dist_weight", "rkd"),
                                checks.check_weight(angle_weight, "angle_weight", "rkd"))


def rkd_distance(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """RKD distance loss (Park et al. 2019) on embeddings [B, ...] (flattened); student and
    teacher widths may differ."""
    checks.check_embeddings(e_s, e_t, "rkd_distance")
    return _relational.rkd_loss(e_s, e_t, 1.0, 0.0, op="rkd_distance")


def rkd_angle(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """RKD angle loss (Park et al. 2019) on embeddings [B, ...] (flattened), from the Gram
    matrix: memory O(B² + B·D), not the reference's [B, B, D]."""
    checks.check_embeddings(e_s, e_t, "rkd_angle")
    return _relational.rkd_loss(e_s, e_t, 0.0, 1.0, op="rkd_angle")


def pkt(e_s: torch.Tensor, e_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018) on embeddings [B, ...].
    As in the canonical code, a sample whose embedding holds a NaN or infinite value counts
    as a zero vector."""
    checks.check_embeddings(e_s, e_t, "pkt")
    return _relational.pkt_loss(e_s, e_t, checks.check_weight(eps, "eps", "pkt"))


def similarity_preserving(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori 2019) as fasterai computes it: MSE between the
    row-normalised (p-norm) Gram matrices of the flattened features."""
    op = "similarity_preserving"
    checks.check_embeddings(f_s, f_t, op, ("f_s", "f_t"))
    return _relational.similarity_preserving_loss(f_s, f_t, checks.check_power(p, op, " (the norm of the Gram rows)"))
