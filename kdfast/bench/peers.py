"""The eager formulas kdfast is measured against, written as their projects write them.

fasterai 0.4.1 (SoftTarget, Attention, Similarity), lenscloth/RKD and RepDistiller (RKD),
RepDistiller (PKT). The benchmarks time these; tests/test_losses.py checks that kdfast
computes the same numbers, so a speed-up is always measured against the same loss.
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
