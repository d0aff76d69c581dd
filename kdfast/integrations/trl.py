"""TRL's generalized JSD loss on kdfast's fused kernels.

``generalized_jsd_loss`` has the signature and the numbers of TRL 1.16's
``GKDTrainer.generalized_jsd_loss`` (also GOLDTrainer's), so a GKD trainer can use it as
it is::

    from trl.experimental.gkd import GKDTrainer
    from kdfast.integrations.trl import generalized_jsd_loss
    GKDTrainer.generalized_jsd_loss = staticmethod(generalized_jsd_loss)

TRL's conventions, which differ from kdfast.functional's: the temperature divides the
logits but the loss is not multiplied by T²; labels equal to -100 leave their tokens out;
``num_items_in_batch`` (the global count of valid tokens under gradient accumulation)
divides the sum when given; 'batchmean' divides by the valid tokens with labels and by the
size of dim 0 without; 'mean' is the mean over every kept element (tokens x vocabulary);
'none' returns the elementwise [tokens, V] terms (computed by the torch formula).

Where kdfast differs from TRL, it is on purpose: the loss is accumulated and returned in
float32 whatever the logits' dtype (TRL computes in the logits' dtype: bfloat16 logits
give a bfloat16 loss); a -inf logit is a class of probability 0 (TRL's ``F.kl_div`` gives
NaN there); 'mean' with every token masked is 0 (TRL: NaN, the mean of nothing).
"""
from __future__ import annotations

import torch.nn.functional as F

from .. import _checks as checks
from .. import functional as KF
from .._dtypes import acc_dtype
from ..ops.softmax_kl import divergence_elements

__all__ = ["generalized_jsd_loss"]

_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """TRL's ``GKDTrainer.generalized_jsd_loss`` (see the module's docstring), fused.

    student_logits, teacher_logits: [..., V] (TRL: [batch, sequence, V]); labels: the
    logits' shape without V, -100 where a token is left out; beta in [0, 1] (0: forward
    KL(teacher ‖ student), 1: reverse KL); temperature > 0.
    """
    op = "generalized_jsd_loss"
    beta = checks.check_beta(beta, op)
    T = checks.check_temperature(temperature, op)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: unknown reduction {reduction!r}; choose one of {', '.join(map(repr, _REDUCTIONS))}")
    if reduction == "none" and num_items_in_batch is None:
        return _elementwise(student_logits, teacher_logits, labels, beta, T, op)
    weight = 1.0 / (T * T)  # kdfast's jsd is T²-scaled, TRL's is not
    divisor = None
    if num_items_in_batch is not None:
        reduction, divisor = "sum", num_items_in_batch
    elif reduction == "mean":  # mean over tokens x V
        weight /= student_logits.shape[-1]
    return KF._softmax_divergence(op, student_logits, teacher_logits, "jsd", beta, T, reduction, -1, labels, -100,
                                  "bucket", weight=weight, divisor=divisor)


def _elementwise(student_logits, teacher_logits, labels, beta, T, op):
    """reduction='none': the [tokens kept, V] (or, without labels, [..., V]) terms."""
    checks.check_pair(student_logits, teacher_logits, op, "student_logits", "teacher_logits")
    labels = checks.check_target(labels, student_logits, student_logits.dim() - 1, op)
    acc = acc_dtype(student_logits.dtype, teacher_logits.dtype)
    ls = F.log_softmax(student_logits.to(acc) / T, -1)
    lt = F.log_softmax(teacher_logits.detach().to(acc) / T, -1)
    terms = divergence_elements(ls, lt, "jsd", beta)
    return terms if labels is None else terms[labels != -100]
