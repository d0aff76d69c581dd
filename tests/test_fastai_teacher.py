"""kdfast.fastai's teacher options (inference mode, channels_last, torch.compile, a teacher
dtype) in real fastai Learners with tiny models: each gives the default's teacher outputs,
loss and student gradients within the tolerance table, and the teacher is left as found
after fit (modes, memory format, dtype, requires_grad), also when fit fails."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fastai")
from fastai.callback.core import CancelFitException  # noqa: E402
from helpers import TOLERANCE, assert_close  # noqa: E402
from test_fastai import (STUDENT_LAYERS, TEACHER_LAYERS, Boom, first_batch_gradients, fit_quietly,  # noqa: E402
                         hooks_on, learner, record_loss, student_net, teacher_net)

import kdfast.losses as L  # noqa: E402
from kdfast.fastai import KnowledgeDistillationCallback  # noqa: E402

# dynamo's tracing without inductor's code generation: the callback's compile path in
# seconds; the inductor compile is the `compile`-marked test below.
EAGER_COMPILE = {"backend": "eager"}

OPTIONS = {
    "inference_mode": dict(teacher_inference_mode=True),
    "channels_last": dict(teacher_channels_last=True),
    "compile": dict(teacher_compile=EAGER_COMPILE),
    "bf16": dict(teacher_dtype=torch.bfloat16),
    "all": dict(teacher_inference_mode=True, teacher_channels_last=True, teacher_compile=EAGER_COMPILE,
                teacher_dtype=torch.bfloat16),
}


def first_batch(loss=None, layers=False, **options):
    """The first batch's loss inputs and the student's gradients under these options."""
    calls = []
    kd = KnowledgeDistillationCallback(teacher_net(), loss or record_loss(calls),
                                       STUDENT_LAYERS if layers else None, TEACHER_LAYERS if layers else None,
                                       **options)
    grads = first_batch_gradients(kd)
    return calls, grads, kd


def teacher_tolerance(options) -> float:
    """A teacher run in bf16 rounds each layer's output to 8 bits: the tolerance table's bf16
    entry; in fp32 (another memory format or a compiled graph sums in another order) fp32's."""
    return TOLERANCE[options.get("teacher_dtype") or torch.float32]


def assert_grads_close(actual, expected, tol, what):
    """Student gradients, each tensor against the largest gradient (a conv bias before a
    BatchNorm has a gradient that is 0 up to rounding)."""
    scale = max(g.abs().max() for g in expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, tol, f"{what}: gradient {i}", floor=float(scale))


@pytest.fixture(scope="module")
def default_run():
    return first_batch()


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_gives_the_default_outputs(name, default_run):
    options = OPTIONS[name]
    (ref,), ref_grads, _ = default_run
    (call,), grads, kd = first_batch(**options)
    tol = teacher_tolerance(options)
    # the loss sees float32 logits, normal tensors (a loss may save them for backward)
    assert call["teacher_pred"].dtype == torch.float32 and not call["teacher_pred"].is_inference()
    assert_close(call["teacher_pred"], ref["teacher_pred"], tol, f"{name}: teacher logits")
    # the KD loss on those logits (LOSS_TOLERANCE is for a kernel on the same inputs: here the
    # inputs differ by the teacher's rounding). The loss moves with that rounding, not in
    # proportion to its own value (small when the student is near the teacher): its error is
    # measured against T x the largest teacher logit, the scale of its first-order change.
    soft_target = L.SoftTarget()
    loss = soft_target(pred=call["pred"], teacher_pred=call["teacher_pred"])
    ref_loss = soft_target(pred=ref["pred"], teacher_pred=ref["teacher_pred"])
    assert_close(loss, ref_loss, tol, f"{name}: loss", floor=soft_target.T * float(ref["teacher_pred"].abs().max()))
    assert_grads_close(grads, ref_grads, tol, name)
    if "teacher_compile" in options:
        assert kd.teacher_compile_seconds is not None and kd.teacher_compile_seconds > 0


@pytest.mark.parametrize("name", ["inference_mode", "all"])
def test_losses_that_save_the_teacher_for_backward(name):
    """Under inference mode the teacher's tensors are copied into normal ones: MSE and FitNet
    save the teacher's tensor for backward, which an inference tensor refuses."""
    options = dict(OPTIONS[name])
    options.pop("teacher_compile", None)  # the compiled teacher distils logits only

    def mse(pred, teacher_pred, **kwargs):
        return F.mse_loss(pred, teacher_pred)

    for loss, layers in ((mse, False), (L.FitNet, True)):
        _, ref_grads, _ = first_batch(loss, layers)
        _, grads, _ = first_batch(loss, layers, **options)
        assert_grads_close(grads, ref_grads, teacher_tolerance(options), f"{name}: {getattr(loss, '__name__', loss)}")


def test_hooked_features_under_options():
    """Hooked teacher layers are found on the bf16 copy and reach the loss in the student's
    dtype, as normal tensors, close to the default's."""
    options = dict(teacher_inference_mode=True, teacher_channels_last=True, teacher_dtype=torch.bfloat16)
    (ref,), _, _ = first_batch(layers=True)
    (call,), _, _ = first_batch(layers=True, **options)
    assert list(call["fm_t"]) == TEACHER_LAYERS
    for k in TEACHER_LAYERS:
        t = call["fm_t"][k]
        assert t.dtype == call["fm_s"][STUDENT_LAYERS[TEACHER_LAYERS.index(k)]].dtype and not t.is_inference()
        assert_close(t, ref["fm_t"][k], TOLERANCE[torch.bfloat16], f"fm_t[{k}]")


def teacher_state(teacher):
    return ([m.training for m in teacher.modules()], [p.requires_grad for p in teacher.parameters()],
            [(id(t), t.dtype, t.stride()) for t in (*teacher.parameters(), *teacher.buffers())],
            {k: v.clone() for k, v in teacher.state_dict().items()})


@pytest.mark.parametrize("how", ["ends", "cancelled", "fails"])
@pytest.mark.parametrize("name", ["channels_last", "bf16", "all"])
def test_teacher_left_as_found(name, how):
    """Modes (a teacher partly in train mode), requires_grad (mixed), memory format, dtype and
    the weights themselves are as before fit, also when fit is cancelled or fails."""
    teacher = teacher_net()
    teacher.train()
    teacher.bn1.eval()
    teacher.conv1.requires_grad_(False)
    before = teacher_state(teacher)
    student = student_net()
    learn = learner(student)
    options = dict(OPTIONS[name])
    kd = KnowledgeDistillationCallback(teacher, L.SoftTarget, **options)
    extra = {"ends": [], "cancelled": [Boom(CancelFitException())], "fails": [Boom(RuntimeError("boom"))]}[how]
    if how == "fails":
        with pytest.raises(RuntimeError, match="boom"):
            fit_quietly(learn, 1, 1e-2, cbs=[kd] + extra)
    else:
        fit_quietly(learn, 1, 1e-2, cbs=[kd] + extra)
    after = teacher_state(teacher)
    assert after[:3] == before[:3]
    for k, v in before[3].items():
        assert torch.equal(after[3][k], v), k
    assert hooks_on(teacher, student) == 0
    assert all(p.is_contiguous() for p in student.parameters())  # the student's format is not touched


def test_a_bf16_copy_is_reused_until_the_teacher_changes():
    """The dtype copy is made once for fits on the same weights, again after they change."""
    teacher = teacher_net()
    kd = KnowledgeDistillationCallback(teacher, L.SoftTarget, teacher_dtype=torch.bfloat16)
    learn = learner()
    fit_quietly(learn, 1, 1e-2, cbs=kd)
    first = kd._copy[1]
    fit_quietly(learn, 1, 1e-2, cbs=kd)
    assert kd._copy[1] is first
    with torch.no_grad():
        teacher.fc.weight.mul_(2)  # e.g. the teacher trained between fits
    fit_quietly(learn, 1, 1e-2, cbs=kd)
    assert kd._copy[1] is not first
    assert torch.equal(kd._copy[1].fc.weight, teacher.fc.weight.bfloat16())


@pytest.mark.parametrize("channels_last", [None, False])
def test_a_bf16_copy_is_an_inference_copy(channels_last):
    """The dtype copy is kdfast.layers.inference_copy's (plain convolutions computing one-pixel
    outputs as products) and runs in channels_last unless told not to; the teacher keeps its
    own layers and format."""
    from kdfast.layers import OnePixelConv2d
    teacher = teacher_net()
    kd = KnowledgeDistillationCallback(teacher, L.SoftTarget, teacher_dtype=torch.bfloat16,
                                       teacher_channels_last=channels_last)
    fit_quietly(learner(), 1, 1e-2, cbs=kd)
    runner = kd._copy[1]
    assert type(runner.conv1) is OnePixelConv2d and type(teacher.conv1) is torch.nn.Conv2d
    assert runner.conv1.weight.is_contiguous(memory_format=torch.channels_last) == (channels_last is None)
    assert teacher.conv1.weight.is_contiguous()


def test_compiled_teacher_is_reused_across_fits():
    kd = KnowledgeDistillationCallback(teacher_net(), L.SoftTarget, teacher_compile=EAGER_COMPILE)
    learn = learner()
    fit_quietly(learn, 1, 1e-2, cbs=kd)
    compiled = kd._compiled[1]
    fit_quietly(learn, 1, 1e-2, cbs=kd)
    assert kd._compiled[1] is compiled


@pytest.mark.compile
@pytest.mark.slow
def test_inductor_compiled_teacher_matches(default_run):
    """teacher_compile=True (inductor): the default's logits and gradients in fp32."""
    (ref,), ref_grads, _ = default_run
    (call,), grads, kd = first_batch(teacher_compile=True)
    assert_close(call["teacher_pred"], ref["teacher_pred"], TOLERANCE[torch.float32], "teacher logits")
    assert_grads_close(grads, ref_grads, TOLERANCE[torch.float32], "compile")
    assert kd.teacher_compile_seconds > 0


def test_bad_teacher_options():
    with pytest.raises(ValueError, match="teacher_compile distils the teacher's logits only"):
        KnowledgeDistillationCallback(teacher_net(), L.Attention, STUDENT_LAYERS, TEACHER_LAYERS,
                                      teacher_compile=True)
    with pytest.raises(TypeError, match="teacher_dtype must be a floating torch.dtype"):
        KnowledgeDistillationCallback(teacher_net(), L.SoftTarget, teacher_dtype="bf16")
    with pytest.raises(TypeError, match="teacher_channels_last must be True, False or None"):
        KnowledgeDistillationCallback(teacher_net(), L.SoftTarget, teacher_channels_last="yes")
    with pytest.raises(TypeError, match="teacher_inference_mode must be True or False"):
        KnowledgeDistillationCallback(teacher_net(), L.SoftTarget, teacher_inference_mode=1)


def test_the_callback_benchmark_holds_every_option_to_the_floors():
    """What `kdfast bench callback` runs: every kdfast provider against fasterai's callback at
    the floors (4x with a tiny CNN student, 1.5x with a ResNet-18 one), every teacher option
    against the default, and the teacher's forward passes alone beside the tiny CNN's epoch."""
    pytest.importorskip("fasterai")
    pytest.importorskip("sklearn")
    pytest.importorskip("torchvision")
    from kdfast.bench import callback as bench

    cases = {case.op: case for case in bench.cases("cpu", quick=False)}
    tiny, resnet = cases["kd_callback_epoch[tiny_cnn]"], cases["kd_callback_epoch[resnet18]"]
    assert "teacher-forward-alone" in tiny.providers and "kdfast[compile]" in tiny.providers
    for case, floor in ((tiny, 4.0), (resnet, 1.5)):
        kdfast = [p for p in case.providers if p.startswith("kdfast")]
        floors = {(f.provider, f.baseline): f.speedup for f in case.floors}
        assert all(floors[(p, "fasterai-callback")] == floor for p in kdfast)
        assert all(floors[(p, "kdfast-callback")] == 1.0 for p in kdfast if p != "kdfast-callback")


def test_the_harness_records_what_a_runner_measured():
    """A runner's ``extra_record()`` (the compile option's compile time) lands in its record."""
    from kdfast.bench.harness import Case, run_case

    def provider():
        def run():
            return None
        run.extra_record = lambda: {"teacher_compile_s": 1.5}
        return run

    case = Case("probe", {"n": 1}, torch.float32, "cpu", {"p": provider})
    (record,) = run_case(case, warmup=0, repeat=1, log=lambda line: None)
    assert record["teacher_compile_s"] == 1.5 and record["repeats"] == 1
