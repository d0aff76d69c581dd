"""``kdfast demo``: fasterai's knowledge-distillation tutorial end to end, offline.

A ResNet-34 teacher (no pretrained weights: nothing is downloaded), then three ResNet-18
students on the same data: alone, with ``SoftTarget`` under the ``cos`` schedule, and with
``Attention`` on the layer pairs ``match_feature_layers`` finds (weight 0.9). fastai shows its
progress bars and epoch tables; the demo ends with a table (accuracy, seconds per epoch, the
distillation overhead over the student alone) and writes a plot of validation accuracy per
epoch and the numbers as JSON into the output folder.

Data: scikit-learn's handwritten digits (1797 images of 8×8 pixels, shipped inside
scikit-learn), written once as PNG files named like the Oxford PETS images
(``seven_0012.png``) and upscaled by ``Resize`` as in the tutorial; or any folder of images
labelled by file name (``--data PATH --label RULE``).

    kdfast demo                          # a few minutes on 2 CPU cores; a GPU is used when present
    kdfast demo --epochs 1 --size 32     # a quick look
    kdfast demo --data ~/.fastai/data/oxford-iiit-pet --label uppercase-first --size 64
    kdfast demo --distributed 2          # the same on 2 processes (torchrun: GPUs, or CPUs over gloo)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
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


def make_dataloaders(files: list[Path], label_func, size: int, bs: int, seed: int = 42):
    from fastai.vision.all import ImageDataLoaders, Resize

    path = files[0].parent
    return ImageDataLoaders.from_path_func(path, files, label_func, valid_pct=0.2, seed=seed,
                                           item_tfms=Resize(size), bs=bs, num_workers=0)


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


def _summary_row(name: str, run: dict, alone: dict | None) -> dict:
    """Seconds per epoch are medians over the epochs: robust to the first epoch's warm-up and
    to other work on the machine."""
    from statistics import median

    row = {"model": name, "final_accuracy": run["accuracy"][-1], "best_accuracy": max(run["accuracy"]),
           "s_per_epoch": median(run["epoch_s"]), "train_s_per_epoch": median(run["train_s"])}
    if alone is not None:
        row["kd_overhead"] = row["train_s_per_epoch"] / median(alone["train_s"]) - 1
    return row


def _print_table(rows: list[dict]) -> None:
    header = f"{'model':<34} {'accuracy':>9} {'best':>7} {'s/epoch':>8} {'train s/epoch':>14} {'KD overhead':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        overhead = f"{r['kd_overhead']:+.0%}" if "kd_overhead" in r else ""
        print(f"{r['model']:<34} {r['final_accuracy']:>9.4f} {r['best_accuracy']:>7.4f} {r['s_per_epoch']:>8.2f} "
              f"{r['train_s_per_epoch']:>14.2f} {overhead:>12}")
    print("(seconds: median over the epochs; KD overhead: training time per epoch over the student alone)")


def _plot(runs: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    styles = {"teacher": dict(color="gray", linestyle="--")}
    for name, run in runs.items():
        epochs = range(1, len(run["accuracy"]) + 1)
        ax.plot(epochs, run["accuracy"], marker="o", label=name, **styles.get(name.split(" ")[0], {}))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_demo(epochs: int = 5, size: int = 32, bs: int = 64, lr: float = 1e-3, data: str | None = None,
             label: str = "uppercase-first", out: str = "demo_out", seed: int = 42, limit: int | None = None) -> dict:
    """The tutorial: teacher, student alone, SoftTarget + cos, Attention on matched layers.
    Returns (and writes to ``out/results.json``) the per-epoch accuracies and the summary."""
    import warnings

    import torch
    from fastai.vision.all import Learner, accuracy, resnet18, resnet34, set_seed, vision_learner

    from .fastai import KnowledgeDistillationCallback, match_feature_layers
    from .losses import Attention, SoftTarget
    from .schedule import cos

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
    dls = make_dataloaders(files, label_func, size, bs, seed)
    device = dls.device
    report(f"data: {source}, {len(files)} images, {len(classes)} classes, {len(dls.train_ds)} train / "
          f"{len(dls.valid_ds)} valid, resized to {size}x{size}, batch {bs}, on {device}"
          + (f", {world} processes (each {bs} per batch)" if world > 1 else ""))

    runs: dict[str, dict] = {}
    report(f"\n== 1. teacher: ResNet-34 (vision_learner, trained from scratch), {epochs} epochs")
    set_seed(seed)
    teacher = vision_learner(dls, resnet34, pretrained=False, metrics=accuracy)
    teacher.unfreeze()
    runs["teacher ResNet-34"] = _fit(teacher, epochs, lr)

    n_classes = len(dls.vocab)
    report("\n== 2. student alone: ResNet-18")
    set_seed(seed)
    student = Learner(dls, resnet18(num_classes=n_classes), metrics=accuracy)
    alone = runs["student alone"] = _fit(student, epochs, lr)

    report("\n== 3. student with SoftTarget, cos schedule")
    set_seed(seed)
    student = Learner(dls, resnet18(num_classes=n_classes), metrics=accuracy)
    kd = KnowledgeDistillationCallback(teacher.model, SoftTarget, schedule=cos)
    runs["SoftTarget + cos"] = _fit(student, epochs, lr, cbs=kd)

    report("\n== 4. student with Attention transfer on matched layers, weight 0.9")
    set_seed(seed)
    student_model = resnet18(num_classes=n_classes)
    pairs = match_feature_layers(student_model, teacher.model, torch.randn(1, 3, size, size))
    report(pairs)
    student = Learner(dls, student_model, metrics=accuracy)
    kd = KnowledgeDistillationCallback(teacher.model, Attention, pairs["student"], pairs["teacher"], weight=0.9)
    runs["Attention (weight 0.9)"] = _fit(student, epochs, lr, cbs=kd)

    rows = [_summary_row(name, run, None if name.startswith(("teacher", "student alone")) else alone)
            for name, run in runs.items()]
    results = {"data": source, "images": len(files), "classes": classes, "size": size, "bs": bs, "lr": lr,
               "epochs": epochs, "device": str(device), "processes": world,
               "torch_threads": torch.get_num_threads(), "pairs": pairs, "runs": runs, "summary": rows}
    if rank != 0:
        return results
    report()
    _print_table(rows)
    plot_path = out_dir / "accuracy.png"
    _plot(runs, plot_path, f"{source}, {size}x{size}: validation accuracy per epoch")
    with open(out_dir / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    report(f"\nwrote {plot_path} and {out_dir / 'results.json'}")
    return results


def main(argv: list[str] | None = None) -> int:
    rules = "\n".join(f"  {k:<16} {v}" for k, v in LABEL_RULES.items())
    parser = argparse.ArgumentParser(
        prog="kdfast demo", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="fasterai's distillation tutorial, offline: a ResNet-34 teacher, a ResNet-18 student alone, "
                    "with SoftTarget (cos schedule) and with Attention transfer on matched layers.",
        epilog=f"labelling rules for --data (--label):\n{rules}")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per model (default 5)")
    parser.add_argument("--size", type=int, default=32, help="image size after Resize (default 32; the tutorial "
                                                             "uses 64)")
    parser.add_argument("--bs", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of fit_one_cycle (default 1e-3)")
    parser.add_argument("--data", help="a folder of images labelled by file name (default: scikit-learn's digits)")
    parser.add_argument("--label", default="uppercase-first", metavar="RULE",
                        help="how --data files are labelled (default uppercase-first, the tutorial's)")
    parser.add_argument("--limit", type=int, help="use only the first N images")
    parser.add_argument("--out", default="demo_out", help="output folder for the plot and results.json "
                                                          "(default demo_out)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--distributed", type=int, default=1, metavar="N",
                        help="train every model on N processes (torchrun; one per GPU, or CPU processes "
                             "over gloo), each with batches of --bs")
    args = parser.parse_args(argv)
    for name in ("epochs", "size", "bs", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1, got {value}")
    if args.size < 16:
        parser.error(f"--size {args.size} is too small for ResNets (they downsample 32×); use 16 or more")
    if args.distributed < 1:
        parser.error(f"--distributed must be at least 1, got {args.distributed}")
    if args.distributed > 1 and _rank_and_world()[1] == 1:
        return _launch(args.distributed, argv if argv is not None else sys.argv[1:])
    try:
        label_function(args.label)  # reject a bad rule before anything is trained
        run_demo(epochs=args.epochs, size=args.size, bs=args.bs, lr=args.lr, data=args.data, label=args.label,
                 out=args.out, seed=args.seed, limit=args.limit)
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
