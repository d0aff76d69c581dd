"""kdfast.fastai: the distillation callback in real fastai Learners (tiny data, small models),
fasterai parity (student gradients, weights, match_feature_layers), and each behaviour
where fasterai 0.4.1 is wrong."""
import functools
from collections import OrderedDict

import pytest
import torch
from torch import nn

pytest.importorskip("fastai")
import fastai.callback.all  # noqa: E402,F401  (fastai's default callbacks and Learner.no_bar)
from fastai.callback.core import Callback, CancelFitException  # noqa: E402
from fastai.callback.channelslast import ChannelsLast  # noqa: E402
from fastai.data.core import DataLoaders  # noqa: E402
from fastai.data.load import DataLoader  # noqa: E402
from fastai.learner import Learner  # noqa: E402
from fastai.losses import CrossEntropyLossFlat  # noqa: E402

import kdfast.losses as L  # noqa: E402
from kdfast.distributed import MixedPrecision as KDMixedPrecision  # noqa: E402
from kdfast.fastai import (KnowledgeDistillationCallback, get_model_layers, get_module_by_name,  # noqa: E402
                           match_feature_layers)
from kdfast.schedule import cos, lin  # noqa: E402

fasterai_cb = pytest.importorskip("fasterai.distill.distillation_callback")
fasterai_losses = pytest.importorskip("fasterai.distill.losses")

N_CLASSES = 4
STUDENT_LAYERS = ["relu1", "relu2"]
TEACHER_LAYERS = ["relu1b", "relu2"]


def student_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 8, 3, padding=1), bn1=nn.BatchNorm2d(8), relu1=nn.ReLU(),
        conv2=nn.Conv2d(8, 16, 3, stride=2, padding=1), bn2=nn.BatchNorm2d(16), relu2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(16, N_CLASSES)))


def teacher_net(seed=1):
    """Deeper than the student; the hooked layers have the student's shapes (FitNet needs that)."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 8, 3, padding=1), bn1=nn.BatchNorm2d(8), relu1=nn.ReLU(),
        conv1b=nn.Conv2d(8, 8, 3, padding=1), bn1b=nn.BatchNorm2d(8), relu1b=nn.ReLU(),
        conv2=nn.Conv2d(8, 16, 3, stride=2, padding=1), bn2=nn.BatchNorm2d(16), relu2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(16, N_CLASSES)))


def make_items(n, seed, labels=True, size=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    return [(x[i], y[i]) if labels else (x[i],) for i in range(n)]


def make_dls(n_train=32, n_valid=16, bs=16, shuffle=False):
    return DataLoaders(DataLoader(make_items(n_train, 0), bs=bs, shuffle=shuffle),
                       DataLoader(make_items(n_valid, 1), bs=bs))


def learner(model=None, dls=None, **kwargs):
    return Learner(dls or make_dls(), model or student_net(), loss_func=CrossEntropyLossFlat(), **kwargs)


def fit_quietly(learn, *args, **kwargs):
    with learn.no_bar(), learn.no_logging():
        learn.fit(*args, **kwargs)


def hooks_on(*models):
    return sum(len(m._forward_hooks) for model in models for m in model.modules())


class Probe(Callback):
    """Calls ``fn(self)`` at an event (after the distillation callback, order 1)."""
    order = 1

    def __init__(self, event, fn):
        setattr(self, event, lambda: fn(self))


class StopAfterFirstBackward(Callback):
    order = 100

    def after_backward(self):
        self.grads = [p.grad.detach().clone() for p in self.learn.model.parameters()]
        raise CancelFitException()


def first_batch_gradients(callback, student_seed=0):
    learn = learner(student_net(student_seed))
    stop = StopAfterFirstBackward()
    fit_quietly(learn, 1, 1e-2, cbs=[callback, stop])
    return stop.grads


# -------------------------------------------------------------------------------------------
# every loss trains

def record_loss(calls):
    def loss(pred, teacher_pred, fm_s, fm_t, target, **kwargs):
        calls.append(dict(pred=pred, teacher_pred=teacher_pred, fm_s=dict(fm_s), fm_t=dict(fm_t), target=target,
                          autocast=torch.is_autocast_enabled("cpu"), grad=torch.is_grad_enabled()))
        return L.SoftTarget(pred=pred, teacher_pred=teacher_pred)
    return loss


LOSSES = {
    "SoftTarget": (L.SoftTarget, False),
    "SoftTarget-T3-partial": (functools.partial(L.SoftTarget, T=3), False),
    "SoftTarget-instance": (L.SoftTarget(T=2), False),
    "Logits": (L.Logits, False),
    "Mutual": (L.Mutual, False),
    "DecoupledKD": (L.DecoupledKD, False),
    "ReverseKL": (L.ReverseKL, False),
    "JSD-partial": (functools.partial(L.JSD, beta=0.3, T=2), False),
    "TVD": (L.TVD(), False),
    "Attention": (L.Attention, True),
    "ActivationBoundaries": (L.ActivationBoundaries, True),
    "FitNet": (L.FitNet, True),
    "Similarity": (L.Similarity, True),
    "RKD-features": (L.RKD, True),
    "PKT-features": (L.PKT, True),
    "RKD-outputs": (L.RKD, False),
    "PKT-outputs": (functools.partial(L.PKT, eps=1e-6), False),
    "fasterai-SoftTarget": (fasterai_losses.SoftTarget, False),
    "fasterai-Attention": (fasterai_losses.Attention, True),
    "user-function": (lambda pred, teacher_pred, **kw: ((pred - teacher_pred) ** 2).mean(), False),
}


@pytest.fixture(scope="module")
def plain_losses():
    learn = learner()
    fit_quietly(learn, 1, 1e-2)
    return torch.stack(learn.recorder.losses)


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_trains(name, plain_losses):
    loss, layers = LOSSES[name]
    teacher = teacher_net()
    before = [p.detach().clone() for p in teacher.parameters()]
    kd = KnowledgeDistillationCallback(teacher, loss, STUDENT_LAYERS if layers else None,
                                       TEACHER_LAYERS if layers else None, weight=0.5)
    learn = learner()
    fit_quietly(learn, 1, 1e-2, cbs=kd)
    train_loss = learn.recorder.losses
    assert all(torch.isfinite(v) for v in train_loss)
    # the blend changed the training loss, not the teacher
    assert not torch.allclose(torch.stack(train_loss), plain_losses)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(p, b) for p, b in zip(teacher.parameters(), before))
    assert hooks_on(learn.model, teacher) == 0


def test_loss_gets_the_batch_in_the_users_layer_order():
    calls = []
    kd = KnowledgeDistillationCallback(teacher_net(), record_loss(calls), ["relu2", "relu1"], ["relu2", "relu1b"])
    fit_quietly(learner(), 1, 1e-2, cbs=kd)
    assert len(calls) == 2  # two training batches, no validation batch
    c = calls[0]
    assert list(c["fm_s"]) == ["relu2", "relu1"] and list(c["fm_t"]) == ["relu2", "relu1b"]
    for s, t in zip(c["fm_s"].values(), c["fm_t"].values()):
        assert s.shape == t.shape and s.requires_grad and not t.requires_grad
    assert c["pred"].shape == c["teacher_pred"].shape == (16, N_CLASSES)
    assert not c["teacher_pred"].requires_grad and c["target"].shape == (16,)


def test_fasterai_pairs_layers_in_firing_order():
    """The defect the test above guards against: fasterai zips the dicts in hook firing order."""
    calls = []
    kd = fasterai_cb.KnowledgeDistillationCallback(teacher_net(), record_loss(calls), ["relu2", "relu1"],
                                                   ["relu2", "relu1b"])
    fit_quietly(learner(), 1, 1e-2, cbs=kd)
    assert list(calls[0]["fm_s"]) == ["relu1", "relu2"]


# -------------------------------------------------------------------------------------------
# fasterai parity

@pytest.mark.parametrize("case", ["SoftTarget", "SoftTarget-cos", "Attention", "DecoupledKD"])
def test_student_gradients_equal_fasterais(case):
    layers = (STUDENT_LAYERS, TEACHER_LAYERS) if case == "Attention" else (None, None)
    schedule = lin if case == "SoftTarget-cos" else None  # weight > 0 at the first batch
    name = case.split("-")[0]

    def run(cb_module, loss):
        return first_batch_gradients(cb_module.KnowledgeDistillationCallback(
            teacher_net(), loss, *layers, weight=0.7, schedule=schedule))

    import kdfast.fastai as kdfast_cb
    reference = run(fasterai_cb, getattr(fasterai_losses, name))
    # the same loss function in both callbacks: bit for bit
    same = run(kdfast_cb, getattr(fasterai_losses, name))
    assert all(torch.equal(a, b) for a, b in zip(same, reference))
    # kdfast's loss (fused kernels): to rounding
    ours = run(kdfast_cb, getattr(L, name))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fasterai_backpropagates_through_the_teacher_kdfast_does_not():
    teacher_fa, teacher_kd = teacher_net(), teacher_net()
    first_batch_gradients(fasterai_cb.KnowledgeDistillationCallback(teacher_fa, fasterai_losses.SoftTarget))
    first_batch_gradients(KnowledgeDistillationCallback(teacher_kd, L.SoftTarget))
    assert any(p.grad is not None for p in teacher_fa.parameters())
    assert all(p.grad is None for p in teacher_kd.parameters())


def test_weight_follows_the_schedule_as_fasterai():
    weights = {}
    for key, module in (("kdfast", None), ("fasterai", fasterai_cb)):
        kd = (module.KnowledgeDistillationCallback if module else KnowledgeDistillationCallback)(
            teacher_net(), L.SoftTarget, weight=0.8, schedule=cos)
        seen = weights[key] = []
        learn = learner(dls=make_dls(n_train=48))
        fit_quietly(learn, 2, 1e-2, cbs=[kd, Probe("after_loss", lambda p: seen.append(
            (p.learn.pct_train, kd.current_weight)) if p.learn.training else None)])
    assert weights["kdfast"] == weights["fasterai"]
    assert [w for _, w in weights["kdfast"]] == [0.8 * cos.progress(p) for p, _ in weights["kdfast"]]
    assert weights["kdfast"][0][1] == 0.0 and weights["kdfast"][-1][1] > 0.7


def test_blend_is_fasterais_lerp():
    seen = []

    def probe(p):
        if p.learn.training:
            seen.append((p.learn.loss_grad.item(), p.learn.loss.item()))
    kd_loss = []

    def loss(pred, teacher_pred, **kw):
        value = L.SoftTarget(pred=pred, teacher_pred=teacher_pred)
        kd_loss.append(value.item())
        return value
    plain = []

    class PlainLoss(Callback):
        order = -1

        def after_loss(self):
            if self.training:
                plain.append(self.learn.loss_grad.item())
    kd = KnowledgeDistillationCallback(teacher_net(), loss, weight=0.3)
    fit_quietly(learner(), 1, 1e-2, cbs=[kd, PlainLoss(), Probe("after_loss", probe)])
    for (blended, logged), p, k in zip(seen, plain, kd_loss):
        assert blended == logged
        assert blended == pytest.approx(0.7 * p + 0.3 * k, rel=1e-6)


# -------------------------------------------------------------------------------------------
# the teacher

def test_teacher_runs_without_grad_in_eval_mode_and_gets_its_modes_back():
    teacher = teacher_net()
    teacher.train()
    teacher.bn1.eval()  # a mix of modes, restored as found
    state = []
    teacher.register_forward_pre_hook(lambda m, inp: state.append((torch.is_grad_enabled(), m.training,
                                                                    m.bn1b.training)))
    kd = KnowledgeDistillationCallback(teacher, L.SoftTarget)
    learn = learner()
    # something flips the teacher to train mode mid-fit: it is put back in eval
    fit_quietly(learn, 1, 1e-2, cbs=[kd, Probe("after_batch", lambda p: teacher.train())])
    assert state == [(False, False, False)] * 2
    assert teacher.training and not teacher.bn1.training and teacher.bn1b.training


def test_teacher_gets_every_input():
    class TwoInputs(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, a, b):
            return self.net(a + 0.5 * b)

    def items(n, seed):
        g = torch.Generator().manual_seed(seed)
        return [(torch.randn(3, 12, 12, generator=g), torch.randn(3, 12, 12, generator=g),
                 torch.tensor(i % N_CLASSES)) for i in range(n)]
    dls = DataLoaders(DataLoader(items(32, 0), bs=16), DataLoader(items(16, 1), bs=16))
    teacher = TwoInputs(teacher_net())
    kd = KnowledgeDistillationCallback(teacher, L.SoftTarget, ["net.relu2"], ["net.relu2"])
    kd.loss = L.Attention
    learn = Learner(dls, TwoInputs(student_net()), loss_func=CrossEntropyLossFlat())
    fit_quietly(learn, 1, 1e-2, cbs=kd)
    assert torch.isfinite(torch.stack(learn.recorder.losses)).all()
    # fasterai calls teacher(self.x) with the tuple of inputs
    fa = fasterai_cb.KnowledgeDistillationCallback(teacher, fasterai_losses.SoftTarget)
    with pytest.raises(TypeError):
        fit_quietly(Learner(dls, TwoInputs(student_net()), loss_func=CrossEntropyLossFlat()), 1, cbs=fa)


@pytest.mark.parametrize("order", [0, 11])
def test_follows_the_students_mixed_precision(order):
    """Under kdfast's MixedPrecision (fastai's, autocasting on the model's device: bf16 on the
    CPU) the teacher runs in bf16; the loss runs outside autocast on float32 logits and on
    the features in the student's bf16 (no upcast copies)."""
    calls, teacher_dtypes = [], []
    teacher = teacher_net()
    teacher.relu2.register_forward_hook(lambda m, i, o: teacher_dtypes.append(o.dtype))
    kd = KnowledgeDistillationCallback(teacher, record_loss(calls), STUDENT_LAYERS, TEACHER_LAYERS)
    kd.order = order  # before or after MixedPrecision (10): same behaviour
    learn = learner(cbs=KDMixedPrecision(amp_mode="bf16"))
    fit_quietly(learn, 1, 1e-2, cbs=kd)
    assert teacher_dtypes and set(teacher_dtypes) == {torch.bfloat16}  # the teacher ran under autocast
    assert calls
    for c in calls:
        assert not c["autocast"]
        assert c["pred"].dtype == c["teacher_pred"].dtype == torch.float32
        assert {t.dtype for t in [*c["fm_s"].values(), *c["fm_t"].values()]} == {torch.bfloat16}
    assert torch.isfinite(torch.stack(learn.recorder.losses)).all()


def test_follows_channels_last_and_restores_the_teachers_format():
    teacher = teacher_net()
    seen = []
    teacher.register_forward_pre_hook(
        lambda m, inp: seen.append(m.conv1b.weight.is_contiguous(memory_format=torch.channels_last)))
    kd = KnowledgeDistillationCallback(teacher, L.Attention, STUDENT_LAYERS, TEACHER_LAYERS)
    fit_quietly(learner(cbs=ChannelsLast()), 1, 1e-2, cbs=kd)
    assert seen and all(seen)
    assert teacher.conv1b.weight.is_contiguous()


# -------------------------------------------------------------------------------------------
# validation and prediction

def test_validation_loss_is_the_plain_loss_and_the_teacher_does_not_run():
    teacher = teacher_net()
    calls = []
    teacher.register_forward_pre_hook(lambda m, inp: calls.append(torch.is_grad_enabled()))
    model = student_net()
    learn = learner(model)
    kd = KnowledgeDistillationCallback(teacher, L.SoftTarget, weight=0.9)
    fit_quietly(learn, 1, 1e-2, cbs=kd)
    assert len(calls) == 2  # the two training batches only
    valid_loss = learn.recorder.values[-1][1]
    plain = learner(model)
    with plain.no_bar():
        assert valid_loss == pytest.approx(plain.validate()[0], rel=1e-6)


def test_blend_valid_restores_fasterais_validation_loss():
    model = student_net()
    teacher = teacher_net().eval()
    losses = {}
    for key, cb in (("fasterai", fasterai_cb.KnowledgeDistillationCallback(teacher, fasterai_losses.Attention,
                                                                           STUDENT_LAYERS, TEACHER_LAYERS)),
                    ("kdfast", KnowledgeDistillationCallback(teacher, L.Attention, STUDENT_LAYERS, TEACHER_LAYERS,
                                                             blend_valid=True)),
                    ("plain", None)):
        learn = learner(model, cbs=cb)
        if key == "fasterai":
            cb.learn = learn
            cb.register_hooks()  # fasterai hooks layers only in before_fit
        with learn.no_bar():
            losses[key] = learn.validate()[0]
    assert losses["kdfast"] == pytest.approx(losses["fasterai"], rel=1e-5)
    assert losses["kdfast"] != pytest.approx(losses["plain"], rel=1e-3)
    assert hooks_on(model, teacher) == 2 * len(STUDENT_LAYERS)  # only fasterai's, left behind


@pytest.mark.parametrize("blend_valid", [False, True])
def test_get_preds_without_labels(blend_valid):
    teacher = teacher_net()
    kd = KnowledgeDistillationCallback(teacher, L.Attention, STUDENT_LAYERS, TEACHER_LAYERS, blend_valid=blend_valid)
    learn = learner(cbs=kd)  # stays attached after fit
    fit_quietly(learn, 1, 1e-2)
    unlabeled = DataLoader(make_items(10, 3, labels=False), bs=4)
    with learn.no_bar():
        preds, targets = learn.get_preds(dl=unlabeled)
        assert preds.shape == (10, N_CLASSES) and targets is None
        preds, targets, losses = learn.get_preds(with_loss=True)  # labelled: per-item losses
    assert losses.shape == (16,) and torch.isfinite(losses).all()
    assert hooks_on(learn.model, teacher) == 0


def test_fasterai_get_preds_without_labels_fails():
    learn = learner(cbs=fasterai_cb.KnowledgeDistillationCallback(teacher_net(), fasterai_losses.SoftTarget))
    with learn.no_bar(), pytest.raises(AttributeError, match="loss_grad"):
        learn.get_preds(dl=DataLoader(make_items(8, 3, labels=False), bs=4))


# -------------------------------------------------------------------------------------------
# layer names, hooks, activations

@pytest.mark.parametrize("names", [["relu1", "relu2"], ["model.relu1", "model.relu2"],
                                   ["module.relu1", "model.module.relu2"]])
def test_student_names_resolve_with_or_without_prefixes(names):
    calls = []
    kd = KnowledgeDistillationCallback(teacher_net(), record_loss(calls), names, ["module.relu1b", "relu2"])
    fit_quietly(learner(), 1, 1e-2, cbs=kd)
    assert [f.shape[1:] for f in calls[0]["fm_s"].values()] == [(8, 12, 12), (16, 6, 6)]


def test_teacher_may_be_a_learner():
    teacher = learner(teacher_net())
    assert KnowledgeDistillationCallback(teacher, L.SoftTarget).teacher is teacher.model
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        KnowledgeDistillationCallback("resnet34", L.SoftTarget)


def test_names_resolve_inside_a_data_parallel_wrapper():
    calls = []
    kd = KnowledgeDistillationCallback(nn.DataParallel(teacher_net()), record_loss(calls), ["relu2"], ["relu2"])
    fit_quietly(learner(nn.DataParallel(student_net())), 1, 1e-2, cbs=kd)
    assert calls[0]["fm_s"]["relu2"].shape == calls[0]["fm_t"]["relu2"].shape


def test_a_bad_layer_name_names_the_closest_ones():
    with pytest.raises(ValueError, match=r"activations_teacher\[1\] = 'relu_2'.*closest names: 'relu2'.*"
                                         r"get_model_layers"):
        KnowledgeDistillationCallback(teacher_net(), L.Attention, STUDENT_LAYERS, ["relu1b", "relu_2"])
    kd = KnowledgeDistillationCallback(teacher_net(), L.Attention, ["relu1", "layer2"], TEACHER_LAYERS)
    learn = learner()
    with pytest.raises(ValueError, match=r"activations_student\[1\] = 'layer2' is not a layer of the student"):
        fit_quietly(learn, 1, cbs=kd)
    assert hooks_on(learn.model) == 0
    with pytest.raises(ValueError, match="is a Parameter, not a layer"):
        KnowledgeDistillationCallback(teacher_net(), L.Attention, ["relu1"], ["conv1.weight"])
    with pytest.raises(ValueError, match="2 student layer.*1 teacher layer"):
        KnowledgeDistillationCallback(teacher_net(), L.Attention, STUDENT_LAYERS, ["relu2"])


def test_fasterai_bad_name_gives_a_nonetype_error():
    kd = fasterai_cb.KnowledgeDistillationCallback(teacher_net(), fasterai_losses.Attention, ["relu1"], ["relu_1"])
    with pytest.raises(AttributeError, match="NoneType"):
        fit_quietly(learner(), 1, cbs=kd)


class Boom(Callback):
    order = 5

    def __init__(self, exc):
        self.exc = exc

    def after_loss(self):
        if self.training:
            raise self.exc


@pytest.mark.parametrize("how", ["ends", "cancelled", "fails", "interrupted"])
def test_hooks_are_removed_after_fit(how):
    teacher = teacher_net()
    teacher.train()
    learn = learner()
    kd = KnowledgeDistillationCallback(teacher, L.Attention, STUDENT_LAYERS, TEACHER_LAYERS)
    extra = {"ends": [], "cancelled": [Boom(CancelFitException())], "fails": [Boom(RuntimeError("boom"))],
             "interrupted": [Boom(KeyboardInterrupt())]}[how]
    during = []
    probe = Probe("before_batch", lambda p: during.append(hooks_on(learn.model, teacher)))
    if how in ("fails", "interrupted"):
        with pytest.raises((RuntimeError, KeyboardInterrupt)):
            fit_quietly(learn, 1, 1e-2, cbs=[kd, probe] + extra)
    else:
        fit_quietly(learn, 1, 1e-2, cbs=[kd, probe] + extra)
    assert during and during[0] == 4
    assert hooks_on(learn.model, teacher) == 0
    assert teacher.training  # modes restored
    assert kd.stored_activation_student == {} and kd.stored_activation_teacher == {}


def test_activations_do_not_outlive_the_loss():
    import weakref
    refs, after_loss, after_batch = [], [], []
    learn = learner()
    learn.model.relu2.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)) if m.training else None)
    kd = KnowledgeDistillationCallback(teacher_net(), L.Attention, STUDENT_LAYERS, TEACHER_LAYERS)
    fit_quietly(learn, 1, 1e-2, cbs=[
        kd, Probe("after_loss", lambda p: after_loss.append(dict(kd.stored_activation_student))),
        Probe("after_batch", lambda p: after_batch.append(refs[-1]() if refs else None))])
    assert len(after_loss) == len(after_batch) == 3  # two training batches, one validation batch
    assert all(a == {} for a in after_loss) and all(r is None for r in after_batch)


def test_a_layer_called_twice_warns_and_uses_its_last_output():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = student_net()
            self.shared = nn.Conv2d(16, 16, 1)

        def forward(self, x):
            x = self.net.relu2(self.net.bn2(self.net.conv2(self.net.relu1(self.net.bn1(self.net.conv1(x))))))
            x = self.shared(self.shared(x))
            return self.net.fc(self.net.flat(self.net.pool(x)))
    calls = []
    kd = KnowledgeDistillationCallback(teacher_net(), record_loss(calls), ["shared"], ["relu2"])
    with pytest.warns(UserWarning, match="'shared' ran 2 times"):
        fit_quietly(learner(Twice()), 1, 1e-2, cbs=kd)


# -------------------------------------------------------------------------------------------
# match_feature_layers, get_model_layers, get_module_by_name

SEED_PAIRS = {"student": ["conv1", "layer1", "layer2", "layer3", "layer4"],
              "teacher": ["0.0", "0.4", "0.5", "0.6", "0"]}


@pytest.fixture(scope="module")
def resnets():
    from fastai.vision.learner import create_vision_model
    from torchvision.models import resnet18, resnet34
    torch.manual_seed(0)
    return resnet18(num_classes=2), create_vision_model(resnet34, n_out=2, pretrained=False)


def test_match_feature_layers_gives_the_tutorials_pairs(resnets):
    student, teacher = resnets
    teacher.eval()  # as after fastai's fit
    x = torch.randn(1, 3, 64, 64)
    assert match_feature_layers(student, teacher, x) == SEED_PAIRS
    assert fasterai_cb.match_feature_layers(student, teacher, x) == SEED_PAIRS


def test_match_feature_layers_in_train_mode_keeps_modes_and_statistics(resnets):
    student, teacher = resnets
    student.train()
    teacher.train()
    teacher[1].eval()  # the head in eval, the body in train: kept as found
    modes = [m.training for m in (*student.modules(), *teacher.modules())]
    stats = [b.clone() for b in (*student.buffers(), *teacher.buffers())]
    x = torch.randn(1, 3, 64, 64)
    assert match_feature_layers(student, teacher, x) == SEED_PAIRS
    assert modes == [m.training for m in (*student.modules(), *teacher.modules())]
    assert all(torch.equal(a, b) for a, b in zip(stats, (*student.buffers(), *teacher.buffers())))
    teacher.train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):  # fasterai: BatchNorm1d
        fasterai_cb.match_feature_layers(student, teacher, x)


def test_match_feature_layers_without_a_shared_resolution():
    a = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1))
    b = nn.Sequential(nn.Conv2d(3, 4, 3, stride=3, padding=1), nn.Conv2d(4, 4, 3, stride=3, padding=1))
    with pytest.raises(ValueError, match=r"share no spatial resolution.*student: 12×12, 6×6; teacher: 8×8, 3×3"):
        match_feature_layers(a, b, torch.randn(2, 3, 24, 24))
    with pytest.raises(ValueError, match="teacher produced no 4-D activations"):
        match_feature_layers(a, nn.Sequential(nn.Flatten(), nn.Linear(3 * 24 * 24, 2)), torch.randn(2, 3, 24, 24))


def test_get_model_layers_and_get_module_by_name_as_fasterai(resnets):
    student, teacher = resnets
    for model in (student, teacher):
        assert get_model_layers(model) == fasterai_cb.get_model_layers(model)
        assert get_model_layers(model, True) == fasterai_cb.get_model_layers(model, True)
    assert get_module_by_name(teacher, "0.4") is teacher[0][4]
    assert get_module_by_name(student, "layer9") is None
