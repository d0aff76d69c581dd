"""One rank of a 2-process distillation fit (run by tests/test_distributed.py under torchrun).

A real fastai fit over gloo on CPU processes, through kdfast's distrib_ctx: records what
this rank saw (samples, KD weights, KD values, blended losses) and its final student weights.
"""
import json
import os
import sys

import torch
from torch import nn

import fastai.callback.all  # noqa: F401  (fastai's default callbacks)
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from sklearn.datasets import load_digits

from kdfast import losses as L
from kdfast.distributed import distrib_ctx
from kdfast.fastai import KnowledgeDistillationCallback
from kdfast.schedule import cos


def net(width: int) -> nn.Module:
    torch.manual_seed(width)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


class Record(Callback):
    """After the KD callback: what this rank trained on and the loss it backpropagated."""
    order = 5

    def before_fit(self):
        self.samples, self.weights, self.blended = 0, [], []

    def before_batch(self):
        if self.training:
            self.samples += len(self.yb[0])
            self.weights.append(self.learn.cbs.filter(lambda c: isinstance(c, KnowledgeDistillationCallback))[0]
                                .current_weight)

    def after_loss(self):
        if self.training:
            plain = self.learn.loss_func(self.pred, *self.yb)
            self.blended.append(abs(float(self.learn.loss_grad) - float(plain)))


def main(out: str, loss: str) -> None:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    dls = DataLoaders.from_dsets(list(zip(x[:400], y[:400])), list(zip(x[400:500], y[400:500])), bs=32,
                                 device="cpu", drop_last=False)  # every image, every epoch
    kd_values = []

    def counted(kd_loss):
        def loss_fn(**kwargs):
            value = kd_loss(**kwargs)
            kd_values.append(float(value))
            return value
        return loss_fn

    student, teacher = net(8), net(16)
    if loss == "softtarget":
        kd = KnowledgeDistillationCallback(teacher, counted(L.SoftTarget(T=4)), schedule=cos, weight=0.7)
    else:  # a feature loss on hooked layers; the second student name carries DDP's prefix
        kd = KnowledgeDistillationCallback(teacher, counted(L.Attention()), ["1", "module.3"], ["1", "3"],
                                           schedule=cos, weight=0.7)
    record = Record()
    learn = Learner(dls, student, loss_func=nn.CrossEntropyLoss(), cbs=[kd, record])
    with learn.no_bar(), distrib_ctx(learn):
        learn.fit(2, 1e-2)
    rank = int(os.environ["RANK"])
    torch.save(student.state_dict(), os.path.join(out, f"student{rank}.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
                   "samples": record.samples, "weights": record.weights, "blended": record.blended,
                   "kd_values": kd_values, "teacher_wrapped": type(teacher).__name__,
                   "hooks_left": sum(len(m._forward_hooks) for m in [*student.modules(), *teacher.modules()])},
                  f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
