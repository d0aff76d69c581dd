"""Bad input gets an error naming the argument, what was seen, and the fix."""
import pytest
import torch

import kdfast
from kdfast import functional as KF
from kdfast import losses as L

s10, t10 = torch.randn(4, 10), torch.randn(4, 10)
top3 = kdfast.topk_logits(t10, 3)


def topk(indices=None, logprobs=None):
    return kdfast.TopK(top3.indices if indices is None else indices, top3.logprobs if logprobs is None else logprobs)


@pytest.mark.parametrize("call,error,pattern", [
    (lambda: KF.soft_target_kl(s10, torch.randn(4, 12)), ValueError,
     r"student_logits has shape \[4, 10\] and teacher_logits \[4, 12\]"),
    (lambda: KF.soft_target_kl(s10, torch.randn(5, 10)), ValueError, r"\[4, 10\].*\[5, 10\]"),
    (lambda: KF.soft_target_kl(s10.long(), t10), TypeError, r"student_logits has dtype torch.int64.*\.float\(\)"),
    (lambda: KF.soft_target_kl(s10, t10 > 0), TypeError, r"teacher_logits has dtype torch.bool"),
    (lambda: KF.soft_target_kl(torch.randn(0, 10), torch.randn(0, 10)), ValueError,
     r"student_logits is empty.*\[0, 10\]"),
    (lambda: KF.soft_target_kl(s10, t10, T=0), ValueError, r"temperature T must be a finite number > 0, got 0"),
    (lambda: KF.soft_target_kl(s10, t10, T=-2.0), ValueError, r"got -2.0"),
    (lambda: KF.soft_target_kl(s10, t10, T=float("nan")), ValueError, r"got nan"),
    (lambda: KF.soft_target_kl(s10, t10, reduction="avg"), ValueError, r"unknown reduction 'avg'.*'batchmean'"),
    (lambda: KF.soft_target_kl(s10, t10, dim=2), ValueError, r"dim=2 is out of range.*\[4, 10\]"),
    (lambda: KF.soft_target_kl(s10, t10, target=torch.zeros(3, dtype=torch.long)), ValueError,
     r"target has shape \[3\].*rows of shape \[4\]"),
    (lambda: KF.soft_target_kl(s10, t10, target=torch.zeros(4)), TypeError,
     r"integer class indices, got dtype torch.float32"),
    (lambda: KF.soft_target_kl(s10, [[0.0] * 10] * 4), TypeError, r"teacher_logits must be a torch.Tensor, got list"),
    (lambda: KF.decoupled_kd(s10, t10, None), ValueError, r"requires `target` labels"),
    (lambda: KF.decoupled_kd(s10, t10, torch.tensor([0, 1, 10, 2])), ValueError, r"class index 10 outside \[0, 10\)"),
    (lambda: KF.decoupled_kd(torch.randn(4, 1), torch.randn(4, 1), torch.zeros(4, dtype=torch.long)), ValueError,
     r"at least 2"),
    (lambda: KF.attention_transfer(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 8, 8)), ValueError,
     r"spatial sizes differ.*match_feature_layers"),
    (lambda: KF.attention_transfer(torch.randn(2, 3), torch.randn(2, 3)), ValueError,
     r"f_s has shape \(2, 3\).*\[B, C, H, W\]"),
    (lambda: KF.attention_transfer(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4), p=0), ValueError,
     r"p must be a number > 0"),
    (lambda: KF.similarity_preserving(torch.randn(3, 8), torch.randn(3, 8), p=float("inf")), ValueError,
     r"similarity_preserving: p must be a number > 0 \(the norm of the Gram rows\), got inf"),
    (lambda: L.Attention(p=True)(fm_s=[torch.randn(2, 3, 4, 4)], fm_t=[torch.randn(2, 3, 4, 4)]), ValueError,
     r"Attention: p must be a number > 0, got True"),
    (lambda: KF.rkd_distance(torch.randn(1, 8), torch.randn(1, 8)), ValueError, r"a batch of 1 sample.*at least 2"),
    (lambda: KF.rkd_angle(torch.randn(1, 8), torch.randn(1, 8)), ValueError, r"at least 2"),
    (lambda: KF.pkt(torch.randn(1, 8), torch.randn(1, 8)), ValueError, r"at least 2"),
    (lambda: KF.similarity_preserving(torch.randn(1, 8), torch.randn(1, 8)), ValueError, r"at least 2"),
    (lambda: KF.pkt(torch.randn(4, 8), torch.randn(3, 8)), ValueError, r"batch size 4 and e_t 3"),
    (lambda: L.Attention(fm_s={"a": torch.randn(2, 3, 4, 4)}, fm_t={}), ValueError,
     r"1 student layers \(a\) but 0 teacher layers"),
    (lambda: L.FitNet(fm_s=None, fm_t=None), ValueError, r"fm_s is None.*activations_student"),
    (lambda: L.FitNet(fm_s={"a": torch.randn(2, 3, 4, 4)}, fm_t={"b": torch.randn(2, 5, 4, 4)}), ValueError,
     r"fm_s has shape \[2, 3, 4, 4\] and fm_t \[2, 5, 4, 4\]"),
    (lambda: L.SoftTarget(T=0), ValueError, r"SoftTarget: temperature T"),
    (lambda: L.SoftTarget(fm_s={}, fm_t={}), ValueError,
     r"SoftTarget compares the model outputs: pass pred= and teacher_pred="),
    (lambda: kdfast.use_backend("gpu"), ValueError, r"unknown backend 'gpu'.*auto, torch, cpu, triton, cuda"),
    (lambda: KF.jsd(s10, t10, beta=1.5), ValueError, r"jsd: beta must be a number in \[0, 1\].*got 1.5"),
    (lambda: KF.jsd(s10, t10, beta=-0.1), ValueError, r"beta must be a number in \[0, 1\]"),
    (lambda: L.JSD(beta=2), ValueError, r"JSD: beta must be a number in \[0, 1\]"),
    (lambda: KF.reverse_kl(s10, t10, T=0), ValueError, r"reverse_kl: temperature T must be a finite number > 0"),
    (lambda: KF.tvd(s10, torch.randn(4, 11)), ValueError,
     r"tvd: student_logits has shape \[4, 10\] and teacher_logits \[4, 11\]"),
    (lambda: kdfast.topk_logits(t10, 11), ValueError, r"topk_logits: k=11 is larger than the 10 classes"),
    (lambda: kdfast.topk_logits(t10, 0), ValueError, r"k must be a positive int"),
    (lambda: kdfast.topk_logits(t10, 3, dtype=torch.int32), TypeError, r"dtype must be a floating dtype"),
    (lambda: KF.jsd(s10, topk(top3.indices.float())), TypeError,
     r"jsd: teacher_logits.indices has dtype torch.float32; class indices must be torch.int32 or torch.int64"),
    (lambda: KF.jsd(s10, topk(logprobs=top3.indices)), TypeError, r"teacher_logits.logprobs has dtype torch.int32"),
    (lambda: KF.jsd(s10, topk(torch.tensor([[0, 1, 10]] * 4))), ValueError,
     r"jsd: teacher_logits.indices holds class index 10 outside \[0, 10\)"),
    (lambda: KF.tvd(s10, topk(torch.tensor([[0, 1, -1]] * 4))), ValueError, r"class index -1 outside \[0, 10\)"),
    (lambda: KF.reverse_kl(s10, topk(torch.tensor([[0, 1, 2]] * 3 + [[5, 2, 5]]))), ValueError,
     r"reverse_kl: teacher_logits.indices repeats class 5 in row 3 \(rows counted.*\); "
     r"the top-k classes of a row must be distinct"),
    (lambda: KF.jsd(s10, topk(logprobs=top3.logprobs[:, :2])), ValueError,
     r"indices has shape \[4, 3\] and teacher_logits.logprobs \[4, 2\]"),
    (lambda: KF.jsd(s10, kdfast.TopK(top3.indices[:3], top3.logprobs[:3])), ValueError,
     r"teacher_logits has shape \[3, 3\] for student_logits \[4, 10\].*class dim \(dim=1\) of size k"),
    (lambda: KF.jsd(s10, kdfast.TopK(top3.indices[:, None], top3.logprobs[:, None])), ValueError,
     r"teacher_logits has shape \[4, 1, 3\] for student_logits \[4, 10\]"),
    (lambda: KF.jsd(s10[:, :2], topk()), ValueError, r"k=3 is larger than the 2 classes"),
    (lambda: KF.jsd(s10, topk(logprobs=-top3.logprobs)), ValueError,
     r"logprobs holds .* > 0; log-probabilities are <= 0 \(these look like logits"),
    (lambda: KF.soft_target_kl(s10, topk(), T=2), ValueError,
     r"soft_target_kl: T=2 with a TopK teacher and tail='bucket'.*tail='renormalize'"),
    (lambda: KF.jsd(s10, topk(), tail="drop"), ValueError, r"unknown tail 'drop'"),
    (lambda: KF.jsd(s10, (top3.indices, top3.logprobs)), TypeError, r"plain tuple.*kdfast.TopK\(indices, logprobs\)"),
])
def test_bad_input_gets_a_clear_error(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_one_rule_for_p():
    """Attention's exponent and similarity's norm take the same values: finite numbers > 0,
    also as one-element tensors."""
    f_s, f_t = torch.randn(3, 2, 4, 4), torch.randn(3, 5, 4, 4)
    assert torch.equal(KF.attention_transfer(f_s, f_t, p=torch.tensor(3.0)), KF.attention_transfer(f_s, f_t, p=3))
    assert torch.equal(KF.similarity_preserving(f_s, f_t, p=torch.tensor(3.0)), KF.similarity_preserving(f_s, f_t, p=3))
    for p in (0, -1.5, float("inf"), float("nan"), "2", True):
        for call in (lambda: KF.attention_transfer(f_s, f_t, p=p), lambda: KF.similarity_preserving(f_s, f_t, p=p)):
            with pytest.raises(ValueError, match=r"p must be a number > 0"):
                call()


def test_nan_and_inf_behaviour_is_documented():
    """What the functional module's docstring promises."""
    assert "NaN" in KF.__doc__ and "-inf" in KF.__doc__
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    s[0, 0] = float("nan")
    t[1, 2] = float("-inf")
    s[2, 1] = float("inf")
    rows = KF.soft_target_kl(s, t, reduction="none")
    assert torch.isnan(rows[0]) and torch.isfinite(rows[1]) and torch.isnan(rows[2])
