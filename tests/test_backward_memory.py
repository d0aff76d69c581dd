"""The fused ops' backward passes write nothing of their inputs' size beyond the gradient.

softmax-KL computes its gradient in the forward pass and only scales it in backward, so
its backward creates no tensor of the logits' size at all; attention transfer creates one
gradient per feature map; the relational ops one gradient of the embeddings' size (RKD
also its centred embeddings, recomputed rather than kept from the forward pass). The
outputs that are saved for backward and not differentiated (softmax-KL's gradient, the
attention maps, the relation matrices) must not be handed to backward as zero-filled
tensors of their size.
"""
import pytest
import torch

import kdfast
from kdfast import functional as KF
from kdfast.ops.attention import KERNELS as ATTENTION_KERNELS
from kdfast.ops.relational import KERNELS as RELATIONAL_KERNELS
from kdfast.ops.softmax_kl import KERNELS as SOFTMAX_KL_KERNELS
from helpers import NewTensorSpy, kernel_backends


def _logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(37, 301, generator=g).requires_grad_(), torch.randn(37, 301, generator=g)


def _features():
    g = torch.Generator().manual_seed(1)
    return ([torch.randn(3, 16, 9, 9, generator=g).requires_grad_(),
             torch.randn(3, 8, 5, 5, generator=g).requires_grad_()],
            [torch.randn(3, 32, 9, 9, generator=g), torch.randn(3, 4, 5, 5, generator=g)])


def _embeddings():
    g = torch.Generator().manual_seed(2)
    return torch.randn(24, 40, generator=g).requires_grad_(), torch.randn(24, 56, generator=g)


CASES = [  # name, kernels, inputs, loss, largest new tensors allowed in backward
    ("soft_target_kl", SOFTMAX_KL_KERNELS, _logits, lambda s, t: KF.soft_target_kl(s, t, T=4.0), 0),
    ("decoupled_kd", SOFTMAX_KL_KERNELS, _logits,
     lambda s, t: KF.decoupled_kd(s, t, torch.arange(s.shape[0]) % s.shape[1]), 0),
    ("reverse_kl", SOFTMAX_KL_KERNELS, _logits, lambda s, t: KF.reverse_kl(s, t, T=2.0), 0),
    ("jsd", SOFTMAX_KL_KERNELS, _logits, lambda s, t: KF.jsd(s, t, beta=0.3), 0),
    ("tvd", SOFTMAX_KL_KERNELS, _logits, KF.tvd, 0),
    ("top-k teacher", SOFTMAX_KL_KERNELS, _logits, lambda s, t: KF.jsd(s, kdfast.topk_logits(t, 16)), 0),
    ("attention_transfer", ATTENTION_KERNELS, _features,
     lambda f_s, f_t: sum(KF.attention_transfer(a, b) for a, b in zip(f_s, f_t)), 2),
    ("rkd", RELATIONAL_KERNELS, _embeddings, KF.rkd, 2),
    ("pkt", RELATIONAL_KERNELS, _embeddings, KF.pkt, 1),
    ("similarity_preserving", RELATIONAL_KERNELS, _embeddings, KF.similarity_preserving, 1),
]


@pytest.mark.parametrize("name,kernels,inputs,loss,allowed", CASES, ids=[c[0] for c in CASES])
def test_backward_creates_only_the_gradient(name, kernels, inputs, loss, allowed):
    backends = kernel_backends("cpu", kernels)
    if not backends:
        pytest.skip("no kernel backend on the CPU here")
    for backend in backends:
        s, t = inputs()
        students = s if isinstance(s, list) else [s]
        with kdfast.use_backend(backend):
            value = loss(s, t)
        spy = NewTensorSpy(min_numel=min(x.numel() for x in students))
        with spy:
            value.backward()
        assert len(spy.created) <= allowed, f"{backend}: {name}'s backward created {spy.created}"
        assert all(x.grad is not None for x in students)
