"""Distillation under autocast: bf16 on the CPU (and CUDA), fp16 with a GradScaler on CUDA.

The teacher runs in the student's precision; every loss takes the low-precision logits and
features as they are (no float32 copies of them), accumulates in float32 and returns float32.
No fastai here: these run on the GPU machine too (`make gpu-check`).
"""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from kdfast import losses as L
from kdfast.ops import relational
from helpers import DEVICES, assert_close



def device_params(dtypes_by_device):
    return [pytest.param(d, dt, marks=[pytest.mark.gpu] if d == "cuda" else [], id=f"{d}-{str(dt)[6:]}")
            for d in DEVICES for dt in dtypes_by_device[d]]


PRECISIONS = device_params({"cpu": [torch.bfloat16], "cuda": [torch.bfloat16, torch.float16]})


def net(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def hooked(model: nn.Module, layers: list[int], store: dict) -> list:
    return [model[i].register_forward_hook(lambda m, inp, out, i=i: store.__setitem__(str(i), out))
            for i in layers]


class UpcastSpy(TorchDispatchMode):
    """Records casts of low-precision tensors to float32/float64 of at least `min_numel` elements."""

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel, self.upcasts = min_numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype, torch.ops.aten.copy_.default):
            src = args[0] if func != torch.ops.aten.copy_.default else args[1]
            dst = out if isinstance(out, torch.Tensor) else None
            if (dst is not None and src.dtype in (torch.bfloat16, torch.float16)
                    and dst.dtype in (torch.float32, torch.float64) and src.numel() >= self.min_numel):
                self.upcasts.append((func, tuple(src.shape)))
        return out


LOSSES = [
    ("SoftTarget", L.SoftTarget(T=4)), ("Mutual", L.Mutual()), ("DecoupledKD", L.DecoupledKD()),
    ("Attention", L.Attention()), ("FitNet", L.FitNet()), ("ActivationBoundaries", L.ActivationBoundaries()),
    ("Similarity", L.Similarity()), ("RKD", L.RKD()), ("PKT", L.PKT()),
]


@pytest.mark.gpu_core
@pytest.mark.parametrize("device,dtype", PRECISIONS)
@pytest.mark.parametrize("name,loss", LOSSES, ids=[n for n, _ in LOSSES])
def test_losses_take_low_precision_inputs_as_they_are(monkeypatch, device, dtype, name, loss):
    # The relational losses convert embeddings for their matmuls a block of columns at a
    # time; blocks far smaller than these maps show that no map-sized copy is made.
    monkeypatch.setattr(relational, "UPCAST_BLOCK", 256)
    student, teacher = net(8, 0).to(device), net(8, 1).to(device)
    fm_s, fm_t = {}, {}
    handles = hooked(student, [1, 3], fm_s) + hooked(teacher, [1, 3], fm_t)
    x = torch.randn(6, 3, 12, 12, device=device)
    y = torch.randint(0, 10, (6,), device=device)
    with torch.autocast(device, dtype=dtype):
        pred = student(x)
        with torch.no_grad():
            teacher_pred = teacher(x)
    for h in handles:
        h.remove()
    assert pred.dtype == dtype and all(f.dtype == dtype for f in [*fm_s.values(), *fm_t.values()])
    spy = UpcastSpy(min_numel=min(f.numel() for f in fm_s.values()))
    with spy:
        value = loss(pred=pred, teacher_pred=teacher_pred, fm_s=fm_s, fm_t=fm_t, target=y)
    assert not spy.upcasts, f"{name} copied low-precision inputs to float32: {spy.upcasts}"
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    first = student[0].weight.grad  # upstream of every logit and hooked feature
    assert first is not None and torch.isfinite(first).all() and first.abs().sum() > 0
    # the same loss on float32 copies of the same inputs
    reference = loss(pred=pred.detach().float(), teacher_pred=teacher_pred.float(),
                     fm_s={k: v.detach().float() for k, v in fm_s.items()},
                     fm_t={k: v.float() for k, v in fm_t.items()}, target=y)
    assert_close(value.detach(), reference, 2e-2 if dtype == torch.float16 else 5e-2, f"{name} value")


@pytest.mark.gpu_core
@pytest.mark.parametrize("device,dtype", PRECISIONS)
def test_training_steps_under_autocast(device, dtype):
    """A few SGD steps with SoftTarget + Attention on hooked features; fp16 with a GradScaler."""
    student, teacher = net(8, 2).to(device), net(16, 3).to(device).eval()
    fm_s, fm_t = {}, {}
    hooked(student, [1, 3], fm_s)
    hooked(teacher, [1, 3], fm_t)
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    torch.manual_seed(4)
    x = torch.randn(16, 3, 12, 12, device=device)
    y = torch.randint(0, 10, (16,), device=device)
    kd_logits, kd_features = L.SoftTarget(T=4), L.Attention()
    losses = []
    for _ in range(8):
        with torch.autocast(device, dtype=dtype):
            pred = student(x)
            with torch.no_grad():
                teacher_pred = teacher(x)
            ce = nn.functional.cross_entropy(pred, y)
        kd = kd_logits(pred=pred.float(), teacher_pred=teacher_pred.float()) + kd_features(fm_s=fm_s, fm_t=fm_t)
        loss = 0.5 * ce + 0.5 * kd
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
