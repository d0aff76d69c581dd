"""The eager formulas kdfast is measured against, written as their projects write them.

fasterai 0.4.1 (SoftTarget, Attention, Similarity), lenscloth/RKD and RepDistiller (RKD),
RepDistiller (PKT), TRL 1.16 (GKDTrainer.generalized_jsd_loss: JSD, and reverse KL as its
beta = 1 end), Liger-Kernel's TVD reference (total variation). The benchmarks time these;
tests/test_losses.py, tests/test_trl.py and tests/test_softmax_kl_divergences.py check that
kdfast computes the same numbers, so a speed-up is always measured against the same loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fasterai_soft_target(pred, teacher_pred, T=4.0):
    """fasterai 0.4.1's SoftTarget."""
    student_soft = F.log_softmax(pred / T, dim=1)
    teacher_soft = F.softmax(teacher_pred / T, dim=1)
    return torch.nn.KLDivLoss(reduction="batchmean")(student_soft, teacher_soft) * (T * T)


def fasterai_attention(fm_s, fm_t, p=2):
    """fasterai 0.4.1's Attention loss, on lists of [B, C, H, W] maps."""
    total = 0.0
    for s, t in zip(fm_s, fm_t):
        a_s = F.normalize(s.pow(p).mean(1), dim=(1, 2))
        a_t = F.normalize(t.pow(p).mean(1), dim=(1, 2))
        total += F.mse_loss(a_s, a_t)
    return total


def fasterai_similarity(student_flat, teacher_flat, p=2):
    """fasterai 0.4.1's Similarity for one layer pair of flattened features."""
    student_sim = F.normalize(student_flat @ student_flat.t(), p=p, dim=1)
    teacher_sim = F.normalize(teacher_flat @ teacher_flat.t(), p=p, dim=1)
    return F.mse_loss(student_sim, teacher_sim)


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
    """RKD distance + angle as lenscloth/RKD and RepDistiller compute it (the [B, B, D]
    tensor of normalised differences), on embeddings flattened to [B, D]."""
    student, teacher = student.view(student.shape[0], -1), teacher.view(teacher.shape[0], -1)
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
    """PKT as RepDistiller computes it, on embeddings flattened to [B, D]."""
    output_net = output_net.view(output_net.shape[0], -1)
    target_net = target_net.view(target_net.shape[0], -1)
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


def trl_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                             reduction="batchmean", num_items_in_batch=None):
    """TRL 1.16's GKDTrainer.generalized_jsd_loss (tests/test_trl.py checks it against the
    installed trl's own)."""
    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log1p(-beta), teacher_log_probs + torch.log(beta)]), dim=0)
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if num_items_in_batch is not None:
        return jsd.sum() / num_items_in_batch
    if reduction == "batchmean":
        denom = mask.sum().clamp_min(1) if labels is not None else max(jsd.size(0), 1)
        return jsd.sum() / denom
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def eager_reverse_kl(student_logits, teacher_logits, T=1.0):
    """T² · KL(p_student ‖ p_teacher), batchmean over dim 0: TRL's reverse-KL branch (beta = 1,
    ``F.kl_div`` on log-probabilities) with kdfast's T² scaling."""
    student_log_probs = F.log_softmax(student_logits / T, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / T, dim=-1)
    kl = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    return kl.sum() / student_logits.shape[0] * (T * T)


def eager_tvd(student_logits, teacher_logits, T=1.0):
    """T · ½ sum |p_student - p_teacher|, batchmean over dim 0 (Liger-Kernel's reference and
    DistillKit compute ½ sum |p - q| of the softmaxes)."""
    p = F.softmax(student_logits / T, dim=-1)
    q = F.softmax(teacher_logits / T, dim=-1)
    return 0.5 * (p - q).abs().sum() / student_logits.shape[0] * T
