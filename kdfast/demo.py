"""``kdfast demo``: knowledge distillation on a small image task end to end, offline.

A teacher trained once from scratch (no pretrained weights: nothing is downloaded), then, for
each of a few seeds, three students on the same data: alone, with ``SoftTarget``, and with
``Attention`` on the layer pairs ``match_feature_layers`` finds (weight 0.9). fastai shows its
progress bars and epoch tables; the demo ends with a table (final accuracy as mean ± std over
the seeds, min–max, each seed's value, each student's gain over the student alone of the same
seed, seconds per epoch, the distillation overhead) and writes a plot of validation accuracy
per epoch (mean curves, bands from the lowest to the highest seed) and the numbers as JSON
into the output folder.

Two settings (``--setting``; any option given on the command line overrides its value):

- ``low-data`` (the default): what distillation buys when labels are few. A ResNet-18 teacher
  learns from every training image (5 epochs); the students are a small CNN (``small_cnn``,
  24k parameters) that see 100 labelled images only (40 epochs, batch 16, lr 1e-2), and
  ``SoftTarget`` runs at T=4, weight 0.9, no schedule. Each seed draws its own 100 images;
  the students of one seed share them, their initial weights and their batch order.
- ``tutorial``: fasterai's tutorial as written: a ResNet-34 teacher, ResNet-18 students, the
  same epochs (5) and images for all, ``SoftTarget`` under the ``cos`` schedule. On the digits
  every model ends near 0.97–0.98: the task is too easy for a teacher to add anything.

Data: scikit-learn's handwritten digits (1797 images of 8×8 pixels, shipped inside
scikit-learn), written once as PNG files named like the Oxford PETS images
(``seven_0012.png``) and upscaled by ``Resize`` as in the tutorial; or any folder of images
labelled by file name (``--data PATH --label RULE``).

    kdfast demo                          # a few minutes on 2 CPU cores; a GPU is used when present
    kdfast demo --setting tutorial       # fasterai's tutorial: ResNet-34 teacher, ResNet-18 students
    kdfast demo --seeds 0,1,2,3,4 --student-images 300 --T 4
    kdfast demo --data ~/.fastai/data/oxford-iiit-pet --label uppercase-first --size 64 --setting tutorial
    kdfast demo --distributed 2          # the same on 2 processes (torchrun: GPUs, or CPUs over gloo)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import OrderedDict
from pathlib import Path

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

LABEL_RULES = {
    "uppercase-first": "the file name starts with an uppercase letter (the tutorial's f[0].isupper(): "
                       "cats vs dogs in Oxford PETS)",
    "prefix": "the file name up to its last '_' (PETS breeds: great_pyrenees_12.jpg -> great_pyrenees)",
    "parent": "the name of the folder holding the file",
    "regex:PATTERN": "the first group of PATTERN searched in the file name (the whole match without a group)",
}


class DemoError(Exception):
    """A problem with the demo's inputs, reported as one message without a traceback."""


# ---------------------------------------------------------------------------------------------
# Data

def write_digits(folder: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """scikit-learn's digits as 8×8 grayscale PNGs named ``<digit name>_<index>.png``
    (written once; existing files are reused). ``limit`` keeps the first images only."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = digits.images, digits.target
    count = len(images) if limit is None else min(limit, len(images))
    files = []
    for i in range(count):
        path = folder / f"{DIGIT_NAMES[labels[i]]}_{i:04d}.png"
        if not path.exists():  # written under a private name, then renamed: ranks may race here
            pixels = np.clip(images[i] * (255 / 16), 0, 255).round().astype(np.uint8)
            partial = path.with_name(f".{path.stem}.{os.getpid()}.png")
            Image.fromarray(pixels, mode="L").save(partial)
            os.replace(partial, path)
        files.append(path)
    return files


def label_function(rule: str):
    """The labelling function of a ``--label`` rule: path -> label."""
    if rule == "uppercase-first":
        return lambda p: Path(p).name[0].isupper()
    if rule == "prefix":
        def prefix(p):
            name = Path(p).name
            return name.rsplit("_", 1)[0] if "_" in name else Path(p).stem
        return prefix
    if rule == "parent":
        return lambda p: Path(p).parent.name
    if rule.startswith("regex:"):
        pattern = rule[len("regex:"):]
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise DemoError(f"--label {rule!r}: {pattern!r} is not a valid regular expression ({e})") from None

        def by_regex(p):
            m = compiled.search(Path(p).name)
            if m is None:
                raise DemoError(f"--label {rule!r}: the pattern does not match the file name {Path(p).name!r}; "
                                f"write a pattern that matches every file name")
            return m.group(1) if compiled.groups else m.group(0)
        return by_regex
    choices = "\n".join(f"  {k:<16} {v}" for k, v in LABEL_RULES.items())
    raise DemoError(f"--label {rule!r} is not a labelling rule; choose one of:\n{choices}")


def image_files(data: str | os.PathLike) -> list[Path]:
    """The images under ``data`` (under ``data/images`` when that exists, as in Oxford PETS)."""
    path = Path(data).expanduser()
    if not path.exists():
        raise DemoError(f"--data {data}: no such folder. Pass a folder of images labelled by file name, "
                        f"e.g. the Oxford PETS folder (fastai's untar_data(URLs.PETS) downloads it to "
                        f"~/.fastai/data/oxford-iiit-pet)")
    if not path.is_dir():
        raise DemoError(f"--data {data}: not a folder; pass the folder that holds the images")
    if (path / "images").is_dir():
        path = path / "images"
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DemoError(f"--data {data}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {path} or below")
    return files


def check_labels(files: list[Path], label_func, rule: str) -> list:
    labels = [label_func(f) for f in files]
    classes = sorted(set(map(str, labels)))
    if len(classes) < 2:
        raise DemoError(f"--label {rule}: every one of the {len(files)} images gets the label {classes[0]!r}; "
                        f"a classifier needs at least two classes; choose another rule "
                        f"({', '.join(LABEL_RULES)})")
    return classes


def make_dataloaders(files: list[Path], label_func, size: int, bs: int, seed: int = 42, train_images: int | None = None,
                     subset_seed: int = 0, vocab=None):
    """fastai DataLoaders: 20% of ``files`` held out for validation (picked by ``seed``: the same
    images for every model), the rest for training; ``train_images`` keeps that many of the
    training images only (drawn by ``subset_seed``), the low-data regime. ``vocab``: the
    teacher's classes, so that a student's class indices are the teacher's."""
    import numpy as np
    from fastai.vision.all import CategoryBlock, DataBlock, ImageBlock, RandomSplitter, Resize

    random_split = RandomSplitter(valid_pct=0.2, seed=seed)  # what ImageDataLoaders.from_path_func uses

    def splitter(items):
        train, valid = random_split(items)
        if train_images is not None and train_images < len(train):
            train = np.random.default_rng(subset_seed).permutation(np.asarray(train))[:train_images].tolist()
        return train, valid

    block = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=vocab)), get_y=label_func, splitter=splitter,
                      item_tfms=Resize(size))
    # validation in batches of 64 at least: a small training batch need not slow the per-epoch validation
    return block.dataloaders(files, path=files[0].parent, bs=bs, val_bs=max(bs, 64), num_workers=0)


# ---------------------------------------------------------------------------------------------
# Training

def _epoch_timer():
    from fastai.callback.core import Callback

    class EpochTimer(Callback):
        """Seconds per epoch: the whole epoch (as fastai's `time` column) and training alone."""
        order = 60

        def before_fit(self):
            self.epoch_s, self.train_s = [], []

        def before_epoch(self):
            self._t0 = time.perf_counter()

        def before_train(self):
            self._t1 = time.perf_counter()

        def after_train(self):
            self.train_s.append(time.perf_counter() - self._t1)

        def after_epoch(self):
            self.epoch_s.append(time.perf_counter() - self._t0)
    return EpochTimer()


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (1 outside torchrun)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _fit(learn, epochs: int, lr: float, cbs=None) -> dict:
    import contextlib

    timer = _epoch_timer()
    distributed = _rank_and_world()[1] > 1
    if distributed:
        from .fastai.distributed import distrib_ctx
    with distrib_ctx(learn) if distributed else contextlib.nullcontext():
        learn.fit_one_cycle(epochs, lr, cbs=[timer] + ([cbs] if cbs is not None else []))
    names = learn.recorder.metric_names[1:-1]  # without 'epoch' and 'time'
    accuracy = [float(row[names.index("accuracy")]) for row in learn.recorder.values]
    return {"accuracy": accuracy, "epoch_s": timer.epoch_s, "train_s": timer.train_s}


def small_cnn(n_classes: int, width: int = 16):
    """The low-data setting's student: three 3×3 convolutions with stride 2 (width, 2·width,
    4·width channels; BatchNorm, ReLU), global average pooling, a linear classifier — about
    24k parameters at width 16, against 11.7M in a ResNet-18 teacher. The blocks are named
    ``layer1``..``layer3`` so that ``match_feature_layers`` pairs them with the teacher's layers
    of the same resolution."""
    from torch import nn

    def block(c_in: int, c_out: int):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                             nn.ReLU(inplace=True))

    return nn.Sequential(OrderedDict([
        ("layer1", block(3, width)), ("layer2", block(width, 2 * width)), ("layer3", block(2 * width, 4 * width)),
        ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(4 * width, n_classes))]))


def spread(values: list[float]) -> dict:
    """Mean and spread of one number over seeds: ``mean``, ``std`` (sample standard deviation,
    n - 1 in the denominator; 0 for a single seed), ``min``, ``max``."""
    from statistics import fmean, stdev

    values = [float(v) for v in values]
    if not values:
        raise ValueError("spread: no values (no seed was run)")
    return {"mean": fmean(values), "std": stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def aggregate(run: dict) -> dict:
    """A model's runs over seeds (``run["per_seed"]``: one ``_fit`` result each) summed up per
    epoch: ``accuracy`` (the mean curve), ``accuracy_std``, ``accuracy_min``, ``accuracy_max``."""
    curves = [r["accuracy"] for r in run["per_seed"]]
    lengths = {len(c) for c in curves}
    if len(lengths) != 1:
        raise ValueError(f"aggregate: the seeds' accuracy curves have different lengths {sorted(lengths)}; "
                         f"every seed must train the same number of epochs")
    per_epoch = [spread(values) for values in zip(*curves)]
    return {**run, **{f"accuracy{'' if k == 'mean' else '_' + k}": [s[k] for s in per_epoch]
                      for k in ("mean", "std", "min", "max")}}


def _summary_row(name: str, run: dict, alone: dict | None) -> dict:
    """Final accuracy over seeds (mean, std, min, max, each seed's); with ``alone`` (the student
    trained without a teacher, same seeds) the gain over it, seed by seed (same initial weights,
    batches and labelled images), and the distillation's time overhead. Seconds per epoch are
    medians over every epoch of every seed: robust to warm-up and to other work on the machine."""
    from statistics import fmean, median

    finals = [r["accuracy"][-1] for r in run["per_seed"]]
    final = spread(finals)
    row = {"model": name, "seeds": run["seeds"], "train_images": run["train_images"], "epochs": run["epochs"],
           "final_accuracy": final["mean"], "final_accuracy_std": final["std"], "final_accuracy_min": final["min"],
           "final_accuracy_max": final["max"], "final_accuracy_per_seed": finals,
           "best_accuracy": fmean(max(r["accuracy"]) for r in run["per_seed"]),
           "s_per_epoch": median(s for r in run["per_seed"] for s in r["epoch_s"]),
           "train_s_per_epoch": median(s for r in run["per_seed"] for s in r["train_s"])}
    if alone is not None:
        gain = spread([f - r["accuracy"][-1] for f, r in zip(finals, alone["per_seed"], strict=True)])
        row.update({"gain_over_alone": gain["mean"], "gain_over_alone_std": gain["std"],
                    "gain_over_alone_min": gain["min"], "gain_over_alone_max": gain["max"],
                    "kd_overhead": row["train_s_per_epoch"] / median(s for r in alone["per_seed"] for s in r["train_s"])
                    - 1})
    return row


def _print_table(rows: list[dict]) -> None:
    header = (f"{'model':<30} {'images':>6} {'epochs':>6} {'accuracy':>16} {'min-max':>13}  {'per seed':<22} "
              f"{'vs alone':>16} {'s/epoch':>8} {'KD overhead':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        several = len(r["seeds"]) > 1
        accuracy = f"{r['final_accuracy']:.4f}" + (f" ± {r['final_accuracy_std']:.4f}" if several else "")
        span = f"{r['final_accuracy_min']:.3f}-{r['final_accuracy_max']:.3f}" if several else ""
        per_seed = " ".join(f"{a:.3f}" for a in r["final_accuracy_per_seed"]) if several else ""
        gain = ""
        if "gain_over_alone" in r:
            gain = f"{r['gain_over_alone']:+.4f}" + (f" ± {r['gain_over_alone_std']:.4f}" if several else "")
        overhead = f"{r['kd_overhead']:+.0%}" if "kd_overhead" in r else ""
        print(f"{r['model']:<30} {r['train_images']:>6} {r['epochs']:>6} {accuracy:>16} {span:>13}  {per_seed:<22} "
              f"{gain:>16} {r['s_per_epoch']:>8.2f} {overhead:>12}")
    seeds = rows[-1]["seeds"]
    print(f"(final validation accuracy; students: mean ± std over seeds {', '.join(map(str, seeds))}, "
          f"vs alone: the gain over the student alone of the same seed; images: training images seen; "
          f"seconds: median over the epochs; KD overhead: training time per epoch over the student alone)")


def _plot(runs: dict[str, dict], path: Path, title: str) -> None:
    """Validation accuracy per epoch: the mean over seeds, a band from the lowest to the highest seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for name, run in runs.items():
        epochs = range(1, len(run["accuracy"]) + 1)
        style = dict(color="gray", linestyle="--") if name.startswith("teacher") else {}
        n = len(run["seeds"])
        line, = ax.plot(epochs, run["accuracy"], marker="o", markersize=3,
                        label=name + (f" (mean of {n} seeds)" if n > 1 else ""), **style)
        if n > 1:
            ax.fill_between(epochs, run["accuracy_min"], run["accuracy_max"], color=line.get_color(), alpha=0.15,
                            linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="bands: lowest to highest seed", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# The two settings: each option left out on the command line takes its setting's value.
SETTINGS = {
    "low-data": dict(
        teacher="resnet18", teacher_epochs=5, student="small-cnn", student_width=16, epochs=40,
        student_images=100, bs=64, student_bs=16, lr=1e-3, student_lr=1e-2, T=4.0, kd_weight=0.9,
        schedule="none", seeds="3"),
    "tutorial": dict(
        teacher="resnet34", teacher_epochs=None, student="resnet18", student_width=16, epochs=5,
        student_images=None, bs=64, student_bs=None, lr=1e-3, student_lr=None, T=5.0, kd_weight=0.5,
        schedule="cos", seeds="3"),
}
SETTING_HELP = {
    "low-data": "the teacher learns from every training image, small CNN students (24k parameters) from 100 "
                "labelled images: what a teacher's soft labels add when labels are few",
    "tutorial": "fasterai's tutorial as written: ResNet-34 teacher, ResNet-18 students, the same epochs and "
                "images for all",
}
TEACHERS = {"resnet34": "ResNet-34", "resnet18": "ResNet-18"}
STUDENTS = {"resnet18": "ResNet-18", "small-cnn": "small CNN"}


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: a count N (seeds 0 .. N-1) or a comma-separated list (``0,1,2``; ``7,`` for seed 7 alone)."""
    text = str(text).strip()
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            count = int(text)
            if count < 1:
                raise DemoError(f"--seeds {text}: a count of seeds must be at least 1")
            seeds = list(range(count))
    except ValueError:
        raise DemoError(f"--seeds {text!r}: give a count (3: seeds 0, 1, 2) or a comma-separated list of integers "
                        f"(0,1,2; 7, for seed 7 alone)") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise DemoError(f"--seeds {text!r}: give at least one seed, each once")
    return seeds


def soft_target_name(T: float, kd_weight: float, schedule: str) -> str:
    """The SoftTarget student's name: the tutorial's "SoftTarget + cos", with whatever differs
    from the tutorial's T=5 and weight 0.5 added."""
    name = "SoftTarget" + (f" T={T:g}" if T != 5 else "") + (f" + {schedule}" if schedule != "none" else "")
    return name + (f", weight {kd_weight:g}" if kd_weight != 0.5 else "")


def run_demo(setting: str = "low-data", epochs: int | None = None, size: int = 32, bs: int | None = None,
             lr: float | None = None, data: str | None = None, label: str = "uppercase-first", out: str = "demo_out",
             seed: int = 42, limit: int | None = None, seeds: str | list[int] | None = None,
             teacher: str | None = None, teacher_epochs: int | None = None, student: str | None = None,
             student_width: int | None = None, student_images: int | None = None, student_bs: int | None = None,
             student_lr: float | None = None, T: float | None = None, kd_weight: float | None = None,
             schedule: str | None = None) -> dict:
    """A teacher trained once (seed ``seed``, which also picks the validation images), then for
    each of ``seeds`` three students: alone, with ``SoftTarget`` and with ``Attention`` on
    matched layers (weight 0.9). Options left at None take ``setting``'s values (``SETTINGS``).
    Returns (and writes to ``out/results.json``) each seed's accuracy per epoch, the mean curves
    with their spread, and the summary; the plot shows the mean curves."""
    import functools
    import warnings

    import torch
    from fastai.vision.all import Learner, accuracy, resnet18, resnet34, set_seed, vision_learner

    from . import schedule as schedules
    from .fastai import KnowledgeDistillationCallback, match_feature_layers
    from .losses import Attention, SoftTarget

    if setting not in SETTINGS:
        raise DemoError(f"--setting {setting!r} is not a setting; choose one of {', '.join(SETTINGS)}")
    given = dict(epochs=epochs, bs=bs, lr=lr, seeds=seeds, teacher=teacher, teacher_epochs=teacher_epochs,
                 student=student, student_width=student_width, student_images=student_images, student_bs=student_bs,
                 student_lr=student_lr, T=T, kd_weight=kd_weight, schedule=schedule)
    o = {k: given[k] if given[k] is not None else v for k, v in SETTINGS[setting].items()}
    o["teacher_epochs"] = o["teacher_epochs"] or o["epochs"]
    o["student_bs"] = o["student_bs"] or o["bs"]
    o["student_lr"] = o["student_lr"] or o["lr"]
    seed_list = o["seeds"] if isinstance(o["seeds"], list) else parse_seeds(o["seeds"])
    if o["teacher"] not in TEACHERS:
        raise DemoError(f"--teacher {o['teacher']!r}: choose one of {', '.join(TEACHERS)}")
    if o["student"] not in STUDENTS:
        raise DemoError(f"--student {o['student']!r}: choose one of {', '.join(STUDENTS)}")
    if o["schedule"] != "none" and o["schedule"] not in schedules.available_schedules():
        raise DemoError(f"--schedule {o['schedule']!r}: choose none or one of "
                        f"{', '.join(schedules.available_schedules())}")

    warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.script.*")
    rank, world = _rank_and_world()
    report = print if rank == 0 else (lambda *args, **kwargs: None)  # one report, from rank 0
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if data is None:
        files = write_digits(out_dir / "digits", limit=limit)
        label_func, label, source = label_function("prefix"), "prefix", "scikit-learn digits"
    else:
        files = image_files(data)[:limit]
        label_func, source = label_function(label), str(data)
    classes = check_labels(files, label_func, label)
    dls = make_dataloaders(files, label_func, size, o["bs"], seed)
    n_train, device = len(dls.train_ds), dls.device
    subset = o["student_images"] is not None and o["student_images"] < n_train
    n_student = o["student_images"] if subset else n_train
    if n_student < o["student_bs"]:
        raise DemoError(f"--student-images {n_student} is fewer than the students' batch (--student-bs "
                        f"{o['student_bs']}): fastai drops the last incomplete training batch, so the students "
                        f"would not train; use --student-bs {n_student} or less, or more --student-images")
    report(f"data: {source}, {len(files)} images, {len(classes)} classes, {n_train} train / {len(dls.valid_ds)} valid, "
           f"resized to {size}x{size}, on {device}" + (f", {world} processes" if world > 1 else ""))
    report(f"setting {setting}: teacher {TEACHERS[o['teacher']]}, {o['teacher_epochs']} epochs on {n_train} images "
           f"(batch {o['bs']}, lr {o['lr']:g}); students {STUDENTS[o['student']]}, {o['epochs']} epochs on "
           f"{n_student} images (batch {o['student_bs']}, lr {o['student_lr']:g}), seeds "
           f"{', '.join(map(str, seed_list))}" + ("" if not subset else " (each seed draws its own images)"))

    runs: dict[str, dict] = {}
    teacher_name = f"teacher {TEACHERS[o['teacher']]}"
    report(f"\n== 1. {teacher_name} (vision_learner, trained from scratch), {o['teacher_epochs']} epochs")
    set_seed(seed)
    arch = {"resnet34": resnet34, "resnet18": resnet18}[o["teacher"]]
    teacher_learn = vision_learner(dls, arch, pretrained=False, metrics=accuracy)
    teacher_learn.unfreeze()
    runs[teacher_name] = {"seeds": [seed], "train_images": n_train, "epochs": o["teacher_epochs"],
                          "per_seed": [_fit(teacher_learn, o["teacher_epochs"], o["lr"])]}
    teacher_model, n_classes = teacher_learn.model, len(dls.vocab)

    def new_student():
        if o["student"] == "resnet18":
            return resnet18(num_classes=n_classes)
        return small_cnn(n_classes, o["student_width"])

    sample = torch.randn(1, 3, size, size)
    pairs = match_feature_layers(new_student(), teacher_model, sample)
    soft_name = soft_target_name(o["T"], o["kd_weight"], o["schedule"])
    kinds = {"student alone": None,
             soft_name: lambda: KnowledgeDistillationCallback(
                 teacher_model, functools.partial(SoftTarget, T=o["T"]), weight=o["kd_weight"],
                 schedule=None if o["schedule"] == "none" else getattr(schedules, o["schedule"])),
             "Attention (weight 0.9)": lambda: KnowledgeDistillationCallback(
                 teacher_model, Attention, pairs["student"], pairs["teacher"], weight=0.9)}
    for name in kinds:
        runs[name] = {"seeds": seed_list, "train_images": n_student, "epochs": o["epochs"], "per_seed": []}
    for s in seed_list:
        student_dls = dls
        if subset or o["student_bs"] != o["bs"]:
            student_dls = make_dataloaders(files, label_func, size, o["student_bs"], seed,
                                           train_images=n_student if subset else None, subset_seed=s, vocab=dls.vocab)
        for i, (name, make_callback) in enumerate(kinds.items(), start=2):
            report(f"\n== {i}. {name}: {STUDENTS[o['student']]}, seed {s}")
            set_seed(s)
            learn = Learner(student_dls, new_student(), metrics=accuracy)
            runs[name]["per_seed"].append(_fit(learn, o["epochs"], o["student_lr"],
                                               cbs=None if make_callback is None else make_callback()))
    runs = {name: aggregate(run) for name, run in runs.items()}

    alone = runs["student alone"]
    rows = [_summary_row(name, run, None if name in (teacher_name, "student alone") else alone)
            for name, run in runs.items()]
    results = {"setting": setting, "data": source, "images": len(files), "classes": classes, "size": size,
               **{k: o[k] for k in ("teacher", "teacher_epochs", "student", "epochs", "bs", "student_bs", "lr",
                                   "student_lr", "T", "kd_weight", "schedule")},
               "student_width": o["student_width"] if o["student"] == "small-cnn" else None,
               "train_images": n_train, "student_images": n_student, "teacher_seed": seed, "seeds": seed_list,
               "device": str(device), "processes": world, "torch_threads": torch.get_num_threads(), "pairs": pairs,
               "runs": runs, "summary": rows}
    if rank != 0:
        return results
    report()
    _print_table(rows)
    plot_path = out_dir / "accuracy.png"
    _plot(runs, plot_path, f"{source}, {size}x{size}, setting {setting}: {STUDENTS[o['student']]} students on "
                           f"{n_student} images\nvalidation accuracy per epoch")
    with open(out_dir / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    report(f"\nwrote {plot_path} and {out_dir / 'results.json'}")
    return results


def main(argv: list[str] | None = None) -> int:
    rules = "\n".join(f"  {k:<16} {v}" for k, v in LABEL_RULES.items())
    settings = "\n".join(f"  {k:<10} {SETTING_HELP[k]}:\n             "
                         + ", ".join(f"{name}={value}" for name, value in SETTINGS[k].items() if value is not None)
                         for k in SETTINGS)
    parser = argparse.ArgumentParser(
        prog="kdfast demo", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Knowledge distillation on a small image task, offline: a teacher trained once, then students "
                    "alone, with SoftTarget and with Attention transfer on matched layers, each over several "
                    "seeds (mean ± std). Default setting low-data; --setting tutorial runs fasterai's tutorial "
                    "(ResNet-34 teacher, ResNet-18 students).",
        epilog=f"settings (--setting; an option given on the command line wins):\n{settings}\n\n"
               f"labelling rules for --data (--label):\n{rules}")
    parser.add_argument("--setting", default="low-data", choices=list(SETTINGS),
                        help="the preset below (default low-data)")
    parser.add_argument("--seeds", help="the students' seeds: a count N (0..N-1) or a list 0,1,2 (default 3); "
                                        "each seed sets the initial weights, the batch order and, with "
                                        "--student-images, which labelled images")
    parser.add_argument("--epochs", type=int, help="epochs per student (low-data 40, tutorial 5)")
    parser.add_argument("--teacher", choices=list(TEACHERS), help="the teacher (vision_learner, from scratch; "
                                                                   "low-data resnet18, tutorial resnet34)")
    parser.add_argument("--teacher-epochs", type=int, help="the teacher's epochs (low-data 5; tutorial: --epochs)")
    parser.add_argument("--student", choices=list(STUDENTS), help="the students' model (low-data small-cnn, "
                                                                   "tutorial resnet18)")
    parser.add_argument("--student-width", type=int, help="small-cnn channels in its first layer (default 16)")
    parser.add_argument("--student-images", type=int, metavar="N",
                        help="the students learn from N of the training images only (low-data 100; the teacher "
                             "sees them all)")
    parser.add_argument("--T", type=float, help="SoftTarget's temperature (low-data 4, tutorial 5)")
    parser.add_argument("--kd-weight", type=float, help="SoftTarget's weight in the loss blend (low-data 0.9, "
                                                        "tutorial 0.5)")
    parser.add_argument("--schedule", help="schedule of SoftTarget's weight: none or a kdfast.schedule name "
                                           "(low-data none, tutorial cos)")
    parser.add_argument("--size", type=int, default=32, help="image size after Resize (default 32; the tutorial "
                                                             "uses 64)")
    parser.add_argument("--bs", type=int, help="the teacher's batch size (default 64)")
    parser.add_argument("--student-bs", type=int, help="the students' batch size (low-data 16, tutorial --bs)")
    parser.add_argument("--lr", type=float, help="the teacher's learning rate of fit_one_cycle (default 1e-3)")
    parser.add_argument("--student-lr", type=float, help="the students' learning rate (low-data 1e-2, tutorial "
                                                         "--lr)")
    parser.add_argument("--data", help="a folder of images labelled by file name (default: scikit-learn's digits)")
    parser.add_argument("--label", default="uppercase-first", metavar="RULE",
                        help="how --data files are labelled (default uppercase-first, the tutorial's)")
    parser.add_argument("--limit", type=int, help="use only the first N images (teacher and students)")
    parser.add_argument("--out", default="demo_out", help="output folder for the plot and results.json "
                                                          "(default demo_out)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the teacher and of the validation split "
                                                             "(default 42)")
    parser.add_argument("--distributed", type=int, default=1, metavar="N",
                        help="train every model on N processes (torchrun; one per GPU, or CPU processes "
                             "over gloo), each with batches of --bs")
    args = parser.parse_args(argv)
    for name in ("epochs", "teacher_epochs", "size", "bs", "student_bs", "limit", "student_images",
                 "student_width"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("lr", "student_lr", "T"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.kd_weight is not None and not 0 <= args.kd_weight <= 1:
        parser.error(f"--kd-weight must be in [0, 1] (the loss is (1 - w)·cross-entropy + w·SoftTarget), "
                     f"got {args.kd_weight}")
    if args.size < 16:
        parser.error(f"--size {args.size} is too small for ResNets (they downsample 32×); use 16 or more")
    if args.distributed < 1:
        parser.error(f"--distributed must be at least 1, got {args.distributed}")
    if args.distributed > 1 and _rank_and_world()[1] == 1:
        return _launch(args.distributed, argv if argv is not None else sys.argv[1:])
    try:
        label_function(args.label)  # reject a bad rule or seed list before anything is trained
        if args.seeds is not None:
            parse_seeds(args.seeds)
        run_demo(setting=args.setting, epochs=args.epochs, size=args.size, bs=args.bs, lr=args.lr, data=args.data,
                 label=args.label, out=args.out, seed=args.seed, limit=args.limit, seeds=args.seeds,
                 teacher=args.teacher, teacher_epochs=args.teacher_epochs, student=args.student,
                 student_width=args.student_width, student_images=args.student_images, student_bs=args.student_bs,
                 student_lr=args.student_lr, T=args.T, kd_weight=args.kd_weight, schedule=args.schedule)
    except DemoError as e:
        print(f"kdfast demo: {e}", file=sys.stderr)
        return 2
    return 0


def _launch(processes: int, argv: list[str]) -> int:
    """Run this demo under torchrun on ``processes`` processes (this machine only)."""
    import subprocess

    rest, skip = [], False
    for a in argv:  # the workers get every option but --distributed
        if skip:
            skip = False
        elif a == "--distributed":
            skip = True
        elif not a.startswith("--distributed="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "kdfast.demo", *rest]
    print("kdfast demo: " + " ".join(["torchrun"] + cmd[3:]), flush=True)
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
