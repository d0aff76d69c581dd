"""Many fits in one process (real fastai Learners, tiny models and data): plain fits, fits
that fail mid-epoch, cancelled fits, different losses and layer pairs, a channels_last
student. After every fit: no hook left on either model, no teacher parameter with a .grad,
every module's train/eval mode and every parameter's memory format as before; resident
memory grows at most 5% after the first 10 fits. 20 fits in the test suite, 100 with
``make soak`` (KDFAST_SOAK_FITS=100: about a minute on 2 cores)."""
import functools
import gc
import os

import pytest
import torch

pytest.importorskip("fastai")
from fastai.callback.core import Callback, CancelFitException  # noqa: E402
from fastai.data.core import DataLoaders  # noqa: E402
from fastai.data.load import DataLoader  # noqa: E402

import kdfast.losses as L  # noqa: E402
from kdfast.fastai import KnowledgeDistillationCallback  # noqa: E402
from test_fastai import fit_quietly, hooks_on, learner, make_items, student_net, teacher_net  # noqa: E402

# (loss, student layers, teacher layers): outputs, one pair, two pairs, a pair that skips one
SETUPS = [
    (L.SoftTarget, None, None),
    (L.Attention, ["relu1", "relu2"], ["relu1b", "relu2"]),
    (L.FitNet, ["relu2"], ["relu2"]),
    (L.DecoupledKD, None, None),
    (functools.partial(L.JSD, beta=0.3), None, None),
    (L.RKD, ["relu2"], ["relu1b"]),
    (L.PKT, None, None),
    (L.Similarity, ["relu1"], ["relu1"]),
]
ENDINGS = ["normal", "exception", "cancel"]


class FailMidEpoch(Callback):
    """Raises at the second training batch."""
    order = 5

    def __init__(self, exc):
        self.exc, self.seen = exc, 0

    def after_loss(self):
        if self.training:
            self.seen += 1
            if self.seen == 2:
                raise self.exc


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _modes(model):
    return [m.training for m in model.modules()]


def _formats(model):
    return [(p.data_ptr() and p.stride()) for p in model.parameters()]


def _fit(i, student, teacher, dls):
    loss, names_s, names_t = SETUPS[i % len(SETUPS)]
    ending = ENDINGS[(i // len(SETUPS)) % len(ENDINGS)]
    if i % 5 == 4:
        student.to(memory_format=torch.channels_last)  # the teacher follows it during fit
    teacher.train()
    if i % 2:
        teacher.bn1.eval()  # a mixed-mode teacher gets its modes back
    student.train()
    modes_t, formats_t, formats_s = _modes(teacher), _formats(teacher), _formats(student)
    kd = KnowledgeDistillationCallback(teacher, loss, names_s, names_t, weight=0.5)
    learn = learner(student, dls)
    extra = {"normal": [], "exception": [FailMidEpoch(RuntimeError("boom"))],
             "cancel": [FailMidEpoch(CancelFitException())]}[ending]
    if ending == "exception":
        with pytest.raises(RuntimeError, match="boom"):
            fit_quietly(learn, 1, 1e-3, cbs=[kd] + extra)
    else:
        fit_quietly(learn, 1, 1e-3, cbs=[kd] + extra)
    where = f"fit {i} ({getattr(loss, 'func', loss).__name__}, {ending})"
    assert hooks_on(student, teacher) == 0, where
    assert all(p.grad is None for p in teacher.parameters()), where
    assert _modes(teacher) == modes_t, where
    assert _formats(teacher) == formats_t and _formats(student) == formats_s, where
    # fastai leaves the student in the mode of the phase that ended the fit; kdfast leaves
    # none of its modules in another
    assert len(set(_modes(student))) == 1, where
    if i % 5 == 4:
        student.to(memory_format=torch.contiguous_format)
    learn.cbs.clear()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident memory read from /proc")
@pytest.mark.slow
def test_many_fits_leave_nothing_behind():
    n_fits = int(os.environ.get("KDFAST_SOAK_FITS", 20))
    student, teacher = student_net(), teacher_net()
    dls = DataLoaders(DataLoader(make_items(16, 0, size=8), bs=8), DataLoader(make_items(8, 1, size=8), bs=8))
    for i in range(10):
        _fit(i, student, teacher, dls)
    gc.collect()
    start = _rss()
    for i in range(10, n_fits):
        _fit(i, student, teacher, dls)
    gc.collect()
    grown = _rss() / start - 1
    assert grown <= 0.05, f"resident memory grew {grown:.1%} over fits 10 to {n_fits}"
