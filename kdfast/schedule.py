"""Schedules: how a value (a distillation weight, a sparsity) progresses from 0 to 1 over
training, with fasterai's classes, names and numbers (fasterai.core.schedule).

    kd = KnowledgeDistillationCallback(teacher, SoftTarget, schedule=cos)
    # distillation weight at each batch = weight * cos.progress(pct_train)

A ``Schedule`` maps the fraction of training done (``pct_train``, 0 to 1) to a progress
value: ``start_val`` before ``start_pct``, ``sched_func(start_val, end_val, 1)`` from
``end_pct`` on, and ``sched_func(start_val, end_val, pos)`` in between, ``pos`` rescaled to
[0, 1]. The module-level schedules (``cos``, ``lin``, ...) are shared instances, as in
fasterai. This module does not need fastai.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

__all__ = ["Schedule", "one_shot", "iterative", "agp", "one_cycle", "cos", "lin", "dsd", "schedules",
           "available_schedules", "sched_oneshot", "sched_iterative", "sched_agp", "sched_onecycle", "sched_dsd",
           "sched_cos", "sched_lin"]


class Schedule:
    """Progress (usually 0 -> 1) as a function of the fraction of training done."""

    def __init__(self, sched_func: Callable[[float, float, float], float], start_pct: float = 0.0,
                 end_pct: float = 1.0, start_val: float = 0.0, end_val: float = 1.0):
        if not callable(sched_func):
            raise TypeError(f"Schedule: sched_func must be a function f(start, end, pos), got "
                            f"{type(sched_func).__name__}")
        if start_pct > end_pct:
            raise ValueError(f"Schedule: start_pct={start_pct!r} is after end_pct={end_pct!r}; the schedule "
                             f"runs from start_pct to end_pct (fractions of training, 0 to 1)")
        self.sched_func, self.start_pct, self.end_pct = sched_func, start_pct, end_pct
        self.start_val, self.end_val = start_val, end_val
        self._current_progress = start_val
        self._previous_progress = start_val

    def progress(self, pct_train: float) -> float:
        """The progress value at ``pct_train`` (0 = start of training, 1 = end)."""
        if pct_train < self.start_pct:
            value = self.start_val
        elif pct_train >= self.end_pct:
            value = self.sched_func(self.start_val, self.end_val, 1.0)
        else:
            pos = (pct_train - self.start_pct) / (self.end_pct - self.start_pct)
            value = self.sched_func(self.start_val, self.end_val, pos)
        self._current_progress = value
        return value

    __call__ = progress

    @property
    def changed(self) -> bool:
        """Whether the progress moved since the last ``after_step()``."""
        return self._previous_progress != self._current_progress

    @property
    def pruned(self) -> bool:  # fasterai's older name
        return self.changed

    def after_step(self) -> None:
        """Mark the current progress as applied."""
        self._previous_progress = self._current_progress

    def after_pruned(self) -> None:  # fasterai's older name
        self.after_step()

    def reset(self) -> None:
        self._current_progress = self.start_val
        self._previous_progress = self.start_val

    def values(self, num_points: int = 1000, target: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """``(pct_train, target * progress)`` on ``num_points`` evenly spaced points (state kept)."""
        saved = self._current_progress, self._previous_progress
        pcts = np.linspace(0, 1, num_points)
        vals = np.array([self.progress(float(p)) * target for p in pcts])
        self._current_progress, self._previous_progress = saved
        return pcts, vals

    def plot(self, target: float = 100, num_points: int = 1000):
        """Plot ``target * progress`` over training (needs matplotlib); returns the axes."""
        import matplotlib.pyplot as plt

        pcts, vals = self.values(num_points, target)
        _, ax = plt.subplots(1, 1, figsize=(8, 6), dpi=100)
        ax.plot(pcts, vals, c="teal", linewidth=2)
        ax.set_xlabel("training iterations (Normalized)")
        ax.set_ylabel("value")
        return ax

    def __repr__(self) -> str:
        name = getattr(self.sched_func, "__name__", repr(self.sched_func))
        return (f"Schedule({name}, start_pct={self.start_pct}, end_pct={self.end_pct}, "
                f"start_val={self.start_val}, end_val={self.end_val})")


# The formulas are fasterai's and fastai's, operation for operation (numpy where they use
# numpy), so the values are the same to the last bit.

def sched_lin(start: float, end: float, pos: float) -> float:
    """Linear: ``start + pos·(end - start)`` (fastai's)."""
    return start + pos * (end - start)


def sched_cos(start: float, end: float, pos: float) -> float:
    """Half cosine from start to end (fastai's): slow, fast, slow."""
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def sched_oneshot(start: float, end: float, pos: float) -> float:
    """Jump straight to the end value."""
    return end


def sched_iterative(start: float, end: float, pos: float, n_steps: int = 3) -> float:
    """``n_steps`` equal steps from start to end."""
    return start + ((end - start) / n_steps) * (np.ceil(pos * n_steps))


def sched_agp(start: float, end: float, pos: float) -> float:
    """Automated gradual pruning (Zhu & Gupta): cubic approach to the end value."""
    return end + (start - end) * (1 - pos) ** 3


def sched_onecycle(start: float, end: float, pos: float, α: float = 14, β: float = 6) -> float:
    """Logistic ramp: ``(1 + e^(β-α)) / (1 + e^(β-α·pos))`` from start to end."""
    out = (1 + np.exp(-α + β)) / (1 + (np.exp((-α * pos) + β)))
    return start + (end - start) * out


def sched_dsd(start: float, end: float, pos: float) -> float:
    """Dense-sparse-dense: up to the end value at mid-training, back to start at the end."""
    if pos < 0.5:
        return start + (1 + math.cos(math.pi * (1 - pos * 2))) * (end - start) / 2
    return end + (1 - math.cos(math.pi * (1 - pos * 2))) * (start - end) / 2


one_shot = Schedule(sched_oneshot, start_pct=0.5)
iterative = Schedule(sched_iterative, start_pct=0.2)
agp = Schedule(sched_agp, start_pct=0.2)
one_cycle = Schedule(sched_onecycle)
cos = Schedule(sched_cos)
lin = Schedule(sched_lin)
dsd = Schedule(sched_dsd)

schedules = ("one_shot", "iterative", "agp", "one_cycle", "cos", "lin", "dsd")


def available_schedules() -> list[str]:
    """The names of the predefined schedules."""
    return list(schedules)
