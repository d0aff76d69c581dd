"""One training epoch of a fastai Learner with fasterai's KnowledgeDistillationCallback vs
kdfast's, on the same data, teacher and student (and the student alone, for reference).

Data: scikit-learn's digits, 1437 training images upscaled to 32×32 (3 channels), batch 64,
held in memory so that image decoding does not blur the comparison. Teacher: ResNet-18.
Students: a tiny CNN and a ResNet-18. Loss: SoftTarget (each library's), weight 0.5.
A provider is one epoch of ``Learner.fit`` (training only: validation is skipped).

Beside the default kdfast callback, the teacher options (TEACHER_OPTIONS) are timed each
alone and together; ``teacher-forward-alone`` is the teacher's forward passes of one epoch
under ``no_grad`` (what a KD epoch cannot avoid with the default options), so that the
records show where a KD epoch's time goes. The compile option's records carry the time of
its one compilation (``teacher_compile_s``), which the first (warm-up) epoch pays.
Needs fastai and fasterai (the test extras); without them there are no cases.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .harness import Case, Floor

N_TRAIN, SIZE, BS = 1437, 32, 64


def digits_items(size: int, n: int):
    """(image [3, size, size], label) pairs: digits scaled to [0, 1], upscaled bilinearly."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(digits.images), generator=g)[:n]
    x = torch.tensor(digits.images, dtype=torch.float32)[order].unsqueeze(1) / 16
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x = ((x - 0.5) / 0.5).contiguous()
    y = torch.tensor(digits.target, dtype=torch.long)[order]
    return list(zip(x, y))


def tiny_cnn(n_out: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, n_out))


def _student(name: str) -> nn.Module:
    from torchvision.models import resnet18
    torch.manual_seed(0)
    return tiny_cnn() if name == "tiny_cnn" else resnet18(num_classes=10)


# kdfast's teacher options timed in the benchmark, by provider name; the ResNet-18 student's
# case times those without a compilation (RESNET18_OPTIONS).
TEACHER_OPTIONS = {
    "kdfast[inference_mode]": dict(teacher_inference_mode=True),
    "kdfast[channels_last]": dict(teacher_channels_last=True),
    "kdfast[bf16]": dict(teacher_dtype=torch.bfloat16),
    "kdfast[bf16+channels_last+inference_mode]": dict(teacher_dtype=torch.bfloat16, teacher_channels_last=True,
                                                      teacher_inference_mode=True),
    "kdfast[compile]": dict(teacher_compile=True),
}
RESNET18_OPTIONS = ["kdfast[channels_last]", "kdfast[bf16]", "kdfast[bf16+channels_last+inference_mode]"]
# KD epoch speed-up over fasterai's callback that every kdfast provider is held to.
FLOORS = {"tiny_cnn": 4.0, "resnet18": 1.5}


def _providers(student_name: str, device: str, options: dict[str, dict]):
    import fastai.callback.all  # noqa: F401  (the default callbacks, as in any fastai script)
    from fastai.callback.core import Callback, CancelValidException
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from torchvision.models import resnet18

    class TrainOnly(Callback):
        def before_validate(self):
            raise CancelValidException()

    items = digits_items(SIZE, N_TRAIN)

    def loaders():
        return DataLoaders(DataLoader(items, bs=BS, shuffle=True, drop_last=True),
                           DataLoader(items[:BS], bs=BS), device=torch.device(device))

    def make_teacher():
        torch.manual_seed(1)
        return resnet18(num_classes=10).to(device).eval()

    def build(make_callback):
        def provider():
            dls, teacher = loaders(), make_teacher()
            cbs = [TrainOnly()]
            callback = make_callback(teacher) if make_callback is not None else None
            if callback is not None:
                cbs.append(callback)
            learn = Learner(dls, _student(student_name).to(device), loss_func=CrossEntropyLossFlat(), cbs=cbs)

            def run():
                with learn.no_bar(), learn.no_logging():
                    learn.fit(1, 1e-3)
            if getattr(callback, "teacher_compile", False):
                run.extra_record = lambda: {"teacher_compile_s": callback.teacher_compile_seconds}
            return run
        return provider

    def teacher_alone():
        dl, teacher = loaders().train, make_teacher()

        def run():
            with torch.no_grad():
                for xb, _ in dl:
                    teacher(xb)
        return run

    def fasterai(teacher):
        from fasterai.distill.distillation_callback import KnowledgeDistillationCallback
        from fasterai.distill.losses import SoftTarget
        return KnowledgeDistillationCallback(teacher, SoftTarget)

    def kdfast(**options):
        def make(teacher):
            from kdfast.fastai import KnowledgeDistillationCallback
            from kdfast.losses import SoftTarget
            return KnowledgeDistillationCallback(teacher, SoftTarget, **options)
        return make

    providers = {"student-alone": build(None)}
    if student_name == "tiny_cnn":  # the teacher's share of a KD epoch where it is most of it
        providers["teacher-forward-alone"] = teacher_alone
    return {**providers, "fasterai-callback": build(fasterai), "kdfast-callback": build(kdfast()),
            **{name: build(kdfast(**opts)) for name, opts in options.items()}}


def cases(device: str, quick: bool) -> list[Case]:
    try:
        import fastai  # noqa: F401
        import fasterai  # noqa: F401
        import sklearn  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as e:
        print(f"callback benchmark skipped: {e} (needs fastai, fasterai, scikit-learn, torchvision)")
        return []
    result = []
    for student, floor in FLOORS.items():
        options = TEACHER_OPTIONS if student == "tiny_cnn" else {k: TEACHER_OPTIONS[k] for k in RESNET18_OPTIONS}
        kdfast_providers = ["kdfast-callback", *options]
        # each kdfast provider against fasterai's callback (the floor), each option against
        # the default (at least as fast: the option's gain)
        floors = [Floor(p, "fasterai-callback", floor) for p in kdfast_providers]
        floors += [Floor(p, "kdfast-callback", 1.0) for p in options]
        result.append(Case(f"kd_callback_epoch[{student}]", {"images": N_TRAIN, "size": SIZE, "bs": BS},
                           torch.float32, device, _providers(student, device, options), floors=floors,
                           note=f"one training epoch of Learner.fit; teacher resnet18, student {student}, "
                                f"SoftTarget, weight 0.5"))
    return result
