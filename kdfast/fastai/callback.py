"""fasterai's ``KnowledgeDistillationCallback``, with the same arguments and numbers.

    from kdfast.all import *
    kd = KnowledgeDistillationCallback(teacher.model, SoftTarget, schedule=cos)
    student.fit_one_cycle(10, 1e-3, cbs=kd)

What differs from fasterai 0.4.1 (each a measured defect there):

- the teacher runs under ``torch.no_grad``, in eval mode, on the batch's device: no
  backward pass through it, no ``.grad`` buffers, no saved teacher activations
  (student gradients are the same);
- the teacher gets every input of the batch (``*xb``);
- it runs under the student's autocast (fastai's ``MixedPrecision``) and in the student's
  memory format (``ChannelsLast``); its logits reach the loss in float32, hooked features
  in the student's feature dtype (no upcast copies), and the loss is computed outside
  autocast;
- the frozen teacher's cost can be cut further by measured options (``teacher_inference_mode``,
  ``teacher_channels_last``, ``teacher_compile``, ``teacher_dtype``; README "The teacher's
  cost in the callback" has their figures); the teacher is left as found after fit (train /
  eval modes, memory format, dtype, ``requires_grad``), also when fit fails;
- validation: the teacher does not run and ``valid_loss`` is the student's plain loss,
  comparable with a student trained alone (``blend_valid=True`` restores fasterai's
  blended validation loss); ``get_preds`` without labels works;
- layer pairs follow the order of the user's lists; names resolve with or without the
  ``model.`` and DDP's ``module.`` prefixes, and a name that does not exist is an error
  naming the closest ones; hooks are removed when fit ends, is cancelled or fails;
  hooked activations are dropped as soon as the loss is computed.
"""
from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from fastai.callback.core import Callback
from fastcore.basics import listify
from torch import nn

from .. import _checks as checks
from .._dtypes import acc_dtype
from ..layers import find_layer, first_device, inference_copy, tensor_state
from ..losses import _INPUTS, DistillationLoss

__all__ = ["KnowledgeDistillationCallback"]


def _as_loss_function(loss):
    """A kdfast loss class (or functools.partial of one with settings only) becomes one
    configured module, built once instead of at every batch; anything else is called as is."""
    if isinstance(loss, type) and issubclass(loss, DistillationLoss):
        return loss()
    if (isinstance(loss, functools.partial) and isinstance(loss.func, type)
            and issubclass(loss.func, DistillationLoss) and not loss.args and _INPUTS.isdisjoint(loss.keywords)):
        return loss.func(**loss.keywords)
    return loss


def _to_loss_dtype(x, dtype: torch.dtype | None = None):
    """Floating tensors (also inside tuples, namedtuples, lists, dicts) in ``dtype``, by
    default the accumulation dtype (float32; float64 kept). fastai's ``apply`` would do the
    walk but rebuilds a namedtuple (e.g. torchvision's InceptionOutputs) from one list."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            return x
        want = dtype or acc_dtype(x.dtype)
        return x if x.dtype == want else x.to(want)
    if isinstance(x, Mapping):
        return {k: _to_loss_dtype(v, dtype) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple
        return type(x)(*[_to_loss_dtype(v, dtype) for v in x])
    if isinstance(x, (tuple, list)):
        return type(x)(_to_loss_dtype(v, dtype) for v in x)
    return x


def _cast_inputs(xs, dtype: torch.dtype | None, channels_last: bool):
    """The batch's inputs as the teacher copy wants them: floating tensors in ``dtype``, 4-d
    ones in channels_last when the teacher is (one conversion here rather than one in its
    first convolution)."""
    if isinstance(xs, torch.Tensor):
        if dtype is not None and xs.is_floating_point() and xs.dtype != dtype:
            xs = xs.to(dtype)
        if channels_last and xs.dim() == 4:
            xs = xs.contiguous(memory_format=torch.channels_last)
        return xs
    if isinstance(xs, Mapping):
        return {k: _cast_inputs(v, dtype, channels_last) for k, v in xs.items()}
    if isinstance(xs, (tuple, list)):
        return type(xs)(_cast_inputs(v, dtype, channels_last) for v in xs)
    return xs


def _plain(x):
    """Tensors made under ``torch.inference_mode`` (also inside tuples, lists, dicts) as normal
    tensors: a loss may save the teacher's tensors for backward (MSE, kdfast's kernels), which
    an inference tensor refuses. One copy of the teacher's logits and hooked features."""
    if isinstance(x, torch.Tensor):
        return x.clone() if x.is_inference() else x
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*[_plain(v) for v in x])
    if isinstance(x, (tuple, list)):
        return type(x)(_plain(v) for v in x)
    return x


def _fingerprint(model: nn.Module) -> tuple:
    """The teacher's current weights (``tensor_state`` of each parameter and buffer): a
    prepared teacher (a dtype copy, a compiled module) is reused while it holds."""
    return tuple(tensor_state(t) for t in (*model.parameters(), *model.buffers()))


def _first_tensor(xs):
    for x in xs:
        if isinstance(x, torch.Tensor):
            return x
        if isinstance(x, (tuple, list)):
            t = _first_tensor(x)
            if t is not None:
                return t
        if isinstance(x, Mapping):
            t = _first_tensor(list(x.values()))
            if t is not None:
                return t
    return None


def _is_channels_last(model: nn.Module) -> bool:
    return any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
               for p in model.parameters())


def _unique_keys(names: list[str]) -> list[str]:
    """Dict keys for the hooked activations: the layer names, a suffix on repeats."""
    keys, seen = [], {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        keys.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return keys


@dataclass
class _PerFit:
    """What the callback sets up for one fit (or, with ``blend_valid``, one validate /
    get_preds outside fit) and undoes after it."""
    loss_fn: Callable
    handles: list = field(default_factory=list)                       # forward hooks
    teacher_modes: list[tuple[nn.Module, bool]] = field(default_factory=list)  # to restore
    teacher_to_contiguous: bool = False     # the teacher was put in channels_last for this fit
    runner: nn.Module | None = None         # what runs: the teacher, or its copy in teacher_dtype
    channels_last: bool = False             # the runner is in channels_last (its inputs are put in it)
    for_validation: bool = False            # attached by before_validate, not before_fit
    device: torch.device | None = None      # the batches' device, where the teacher was moved
    warned_repeat: set[str] = field(default_factory=set)  # student layers that ran twice


@dataclass
class _PerBatch:
    """What one batch captures, dropped once its loss is computed."""
    fm_s: list      # hooked student activations, one slot per layer
    fm_t: list      # hooked teacher activations
    calls_s: list   # how often each student layer ran in this forward pass
    capture: bool = False           # this batch is distilled: hooks record
    teacher_running: bool = False   # inside the teacher's forward (student hooks stay quiet)
    teacher_pred: Any = None

    @classmethod
    def empty(cls, n_student: int, n_teacher: int, capture: bool = False) -> _PerBatch:
        return cls([None] * n_student, [None] * n_teacher, [0] * n_student, capture)


class KnowledgeDistillationCallback(Callback):
    """Distil ``teacher`` into the Learner's model: the training loss becomes
    ``(1 - w)·loss + w·KD`` with ``KD = loss(pred=, teacher_pred=, fm_s=, fm_t=, target=)`` and
    ``w = weight × schedule.progress(pct_train)`` (``weight`` without a schedule) — fasterai's
    arguments and blend.

    teacher: the trained teacher (an ``nn.Module``; a Learner's ``.model``). Left frozen
        in eval mode during fit, moved to the batch's device; its train/eval modes and
        memory format are restored after fit.
    loss: a kdfast loss (``SoftTarget``, ``Attention``, ... — the class, an instance, or
        ``functools.partial(SoftTarget, T=3)``) or any function with that call convention.
    activations_student / activations_teacher: names of the layers whose outputs are
        compared (intermediate losses), paired in the order given; ``'model.'`` and
        ``'module.'`` prefixes are optional. ``match_feature_layers`` finds pairs.
    weight: weight of the distillation loss in the blend.
    schedule: a ``kdfast.schedule.Schedule`` (``cos``, ``lin``, ...) or any ``f(pct_train)``.
    blend_valid: also blend the validation loss (fasterai's behaviour: the teacher runs on
        every validation batch and ``valid_loss`` moves with the schedule). Default False:
        ``valid_loss`` is the student's own loss.

    The teacher's cost (its forward pass is most of a KD epoch with a small student):
    teacher_inference_mode: run it under ``torch.inference_mode`` instead of ``no_grad``
        (no version counters or autograd metadata on its tensors); its logits and hooked
        features are then copied once into normal tensors, which a loss may save for backward.
    teacher_channels_last: run it in channels_last (its inputs too): True, False, or None
        (default) to follow the student's memory format (fastai's ``ChannelsLast``), and use
        channels_last for a bfloat16 or float16 ``teacher_dtype`` copy (the format oneDNN's and
        cuDNN's 16-bit convolutions are fastest in).
    teacher_compile: ``torch.compile`` the frozen eval-mode teacher (True, or a dict of
        ``torch.compile`` arguments). It compiles at the first distilled batch and is reused
        by later fits while the teacher's weights, dtype and device stay the same; the time it
        took is ``teacher_compile_seconds``. Distils the logits only (no ``activations_teacher``:
        a compiled module does not call hooks added after it was compiled).
    teacher_dtype: run a copy of the teacher in this dtype (e.g. ``torch.bfloat16``, for
        hardware with fast bf16 such as AMX CPUs or GPUs); the inputs are cast to it and its
        outputs back to the student's dtype. The copy is ``kdfast.layers.inference_copy``
        (convolutions with a one-pixel output computed as one matrix product) and costs the
        teacher's size in that dtype; the teacher itself is not changed.

    When the weight is 0 (e.g. the first batch under ``cos``), the teacher is not run.
    """

    order = 0

    def __init__(self, teacher: nn.Module, loss: Callable, activations_student: str | list[str] | None = None,
                 activations_teacher: str | list[str] | None = None, weight: float = 0.5,
                 schedule=None, blend_valid: bool = False, teacher_inference_mode: bool = False,
                 teacher_channels_last: bool | None = None, teacher_compile: bool | dict = False,
                 teacher_dtype: torch.dtype | None = None):
        if hasattr(teacher, "model") and isinstance(getattr(teacher, "model"), nn.Module) \
                and not isinstance(teacher, nn.Module):
            teacher = teacher.model  # a fastai Learner
        student_names, teacher_names = list(listify(activations_student)), list(listify(activations_teacher))
        checks.check_callback_arguments(teacher, loss, weight, schedule, student_names, teacher_names)
        self.teacher, self.loss = teacher, loss
        self.activations_student = student_names or None
        self.activations_teacher = teacher_names or None
        self.weight, self.schedule, self.blend_valid = float(weight), schedule, bool(blend_valid)
        self.current_weight = float(weight)
        self._fit: _PerFit | None = None
        self._batch = _PerBatch.empty(len(student_names), len(teacher_names))
        for i, name in enumerate(teacher_names):  # fail now rather than at fit
            find_layer(teacher, name, f"activations_teacher[{i}]", "teacher")
        checks.check_teacher_options(teacher_inference_mode, teacher_channels_last, teacher_compile,
                                     teacher_dtype, teacher_names)
        self.teacher_inference_mode = bool(teacher_inference_mode)
        self.teacher_channels_last, self.teacher_compile = teacher_channels_last, teacher_compile
        self.teacher_dtype = teacher_dtype
        self.teacher_compile_seconds: float | None = None  # the last compilation's time
        self._copy: tuple | None = None       # (fingerprint, dtype copy of the teacher)
        self._compiled: tuple | None = None   # (key, compiled runner)

    # fastai attaches a callback by setting ``cb.learn`` and detaches it (also when fit
    # raises) by setting it to None: that is where hooks of a failed fit are removed.
    @property
    def learn(self):
        return self.__dict__.get("_learn")

    @learn.setter
    def learn(self, value):
        if value is not self.learn:
            self._detach()
        self.__dict__["_learn"] = value

    # fasterai's attributes, read-only views of the current batch
    @property
    def stored_activation_student(self) -> dict:
        return self._activations(self.activations_student, self._batch.fm_s)

    @property
    def stored_activation_teacher(self) -> dict:
        return self._activations(self.activations_teacher, self._batch.fm_t)

    @staticmethod
    def _activations(names, slots) -> dict:
        if not names or not slots:
            return {}
        return {k: v for k, v in zip(_unique_keys(names), slots) if v is not None}

    # -- export --------------------------------------------------------------------------------
    # learn.export() pickles the Learner with the callbacks it holds: the teacher is left out
    # of the file (predicting does not need it, and it is often larger than the student), as
    # are the hooks and activations of a fit. A loaded callback distils nothing until it is
    # given a teacher again (``cb.teacher = model``); predicting works without one, training
    # without one is an error.
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update(teacher=None, _fit=None,
                     _batch=_PerBatch.empty(len(self.activations_student or ()), len(self.activations_teacher or ())))
        return state

    # -- set up and tear down ------------------------------------------------------------------
    def _attach(self, for_validation: bool = False) -> None:
        self._detach()
        if self.teacher is None:  # loaded from an export: get_preds runs before_fit too
            return
        student = self.learn.model
        fit = _PerFit(_as_loss_function(self.loss), for_validation=for_validation,
                      teacher_modes=[(m, m.training) for m in self.teacher.modules()])
        self.teacher.eval()
        channels_last = self.teacher_channels_last
        if channels_last is None:  # the student's format; channels_last for a 16-bit copy (oneDNN, tensor cores)
            channels_last = _is_channels_last(student) or self.teacher_dtype in (torch.bfloat16, torch.float16)
        fit.runner = self._dtype_copy() if self.teacher_dtype is not None else self.teacher
        if channels_last and not _is_channels_last(fit.runner):
            fit.runner.to(memory_format=torch.channels_last)
            fit.teacher_to_contiguous = fit.runner is self.teacher
        elif not channels_last and fit.runner is not self.teacher and _is_channels_last(fit.runner):
            fit.runner.to(memory_format=torch.contiguous_format)  # the copy, as a later fit wants it
        fit.channels_last = channels_last and _is_channels_last(fit.runner)
        names_s, names_t = self.activations_student or [], self.activations_teacher or []
        modules_s = [find_layer(student, n, f"activations_student[{i}]", "student (learn.model)")
                     for i, n in enumerate(names_s)]
        modules_t = [find_layer(fit.runner, n, f"activations_teacher[{i}]", "teacher")
                     for i, n in enumerate(names_t)]
        fit.handles += [m.register_forward_hook(self._student_hook(i)) for i, m in enumerate(modules_s)]
        fit.handles += [m.register_forward_hook(self._teacher_hook(i)) for i, m in enumerate(modules_t)]
        self.__dict__["_fit"] = fit

    def _dtype_copy(self) -> nn.Module:
        """A frozen eval-mode copy of the teacher in ``teacher_dtype`` (``inference_copy``:
        one-pixel convolutions as matrix products), made again only when the teacher's weights
        changed since the last fit (the user's teacher is never cast: a cast to bf16 and back
        would round its weights)."""
        key = (_fingerprint(self.teacher), self.teacher_dtype)
        if self._copy is None or self._copy[0] != key:
            self._copy = self._compiled = None  # free the old copy before making the new one
            self._copy = (key, inference_copy(self.teacher, self.teacher_dtype))
        return self._copy[1]

    def _compiled_runner(self, runner: nn.Module) -> nn.Module:
        """``torch.compile`` of the runner, made once per module: the compiled code reads the
        weights at each call, and its guards recompile when their dtype, device or memory
        format, or the autocast state, change."""
        if self._compiled is None or self._compiled[0] is not runner:
            options = self.teacher_compile if isinstance(self.teacher_compile, dict) else {}
            self._compiled = (runner, torch.compile(runner, **options))
            self.__dict__["_compile_pending"] = True
        return self._compiled[1]

    def _detach(self) -> None:
        fit = self.__dict__.get("_fit")
        if fit is None:
            return
        for h in fit.handles:
            h.remove()
        self._new_batch()
        for m, training in fit.teacher_modes:
            m.training = training
        if fit.teacher_to_contiguous:
            self.teacher.to(memory_format=torch.contiguous_format)
        self.__dict__["_fit"] = None

    def _new_batch(self, capture: bool = False) -> None:
        n_s, n_t = len(self.activations_student or ()), len(self.activations_teacher or ())
        self.__dict__["_batch"] = _PerBatch.empty(n_s, n_t, capture)

    def _student_hook(self, i: int):
        def hook(module, inputs, output):
            batch = self._batch
            if batch.capture and not batch.teacher_running:
                batch.fm_s[i] = output
                batch.calls_s[i] += 1
        return hook

    def _teacher_hook(self, i: int):
        def hook(module, inputs, output):
            batch = self._batch
            if batch.teacher_running:
                batch.fm_t[i] = output
        return hook

    # -- fastai events -------------------------------------------------------------------------
    def before_fit(self) -> None:
        self._attach()

    def before_train(self) -> None:
        if self.teacher is None:
            raise RuntimeError("KnowledgeDistillationCallback has no teacher: it was loaded from learn.export(), "
                               "which leaves the teacher out. Give it one (cb.teacher = teacher_model) or remove "
                               "it (learn.remove_cb(KnowledgeDistillationCallback)) before fitting")

    def after_fit(self) -> None:
        self._detach()

    def before_validate(self) -> None:
        # validate() / get_preds() outside fit: hooks are only needed to blend the loss
        if self.blend_valid and self._fit is None and self.teacher is not None:
            self._attach(for_validation=True)

    def after_validate(self) -> None:
        if self._fit is not None and self._fit.for_validation:
            self._detach()

    def before_batch(self) -> None:
        if self.schedule is not None:
            progress = self.schedule.progress(self.pct_train) if hasattr(self.schedule, "progress") \
                else self.schedule(self.pct_train)
            self.current_weight = self.weight * float(progress)
        self._new_batch(capture=bool(self._fit is not None and (self.training or self.blend_valid)
                                     and len(self.yb) and self.current_weight != 0))

    def after_pred(self) -> None:
        """Run the teacher on the same inputs, in the same autocast context as the student."""
        batch, fit = self._batch, self._fit
        if not batch.capture:
            return
        runner = fit.runner
        x = _first_tensor(self.xb)
        if x is not None and x.device != fit.device:
            for model in {id(m): m for m in (self.teacher, runner)}.values():
                device = first_device(model)
                if device is not None and device != x.device:
                    model.to(x.device)
            fit.device = x.device
        if runner.training:
            runner.eval()
        xb = self.xb
        if self.teacher_dtype is not None or fit.channels_last:
            xb = _cast_inputs(tuple(xb), self.teacher_dtype, fit.channels_last)
        if self.teacher_compile:
            runner = self._compiled_runner(runner)
        batch.teacher_running = True
        start = time.perf_counter()
        try:
            if self.teacher_inference_mode:
                with torch.inference_mode():
                    pred = runner(*xb)
                batch.teacher_pred = _plain(pred)
                batch.fm_t = _plain(batch.fm_t)
            else:
                with torch.no_grad():
                    batch.teacher_pred = runner(*xb)
        finally:
            batch.teacher_running = False
        if self.__dict__.pop("_compile_pending", False):
            self.teacher_compile_seconds = time.perf_counter() - start

    def after_loss(self) -> None:
        if not self._batch.capture:
            return
        try:
            self._blend()
        finally:
            self._new_batch()  # the student's graph keeps what backward needs; drop the rest now

    def after_batch(self) -> None:
        self._new_batch()

    def after_cancel_batch(self) -> None:
        self._new_batch()

    # -- the loss ------------------------------------------------------------------------------
    def _check_hooked_layers(self) -> None:
        batch, fit = self._batch, self._fit
        for i, calls in enumerate(batch.calls_s):
            name = self.activations_student[i]
            if calls == 0:
                raise RuntimeError(f"KnowledgeDistillationCallback: the student's layer {name!r} "
                                   f"(activations_student[{i}]) did not run in the forward pass; hook a layer "
                                   f"that the model's forward uses")
            if calls > 1 and name not in fit.warned_repeat:
                fit.warned_repeat.add(name)
                warnings.warn(f"KnowledgeDistillationCallback: the student's layer {name!r} ran {calls} times in "
                              f"one forward pass; its last output is distilled", stacklevel=3)
        for i, f in enumerate(batch.fm_t):
            if f is None:
                raise RuntimeError(f"KnowledgeDistillationCallback: the teacher's layer "
                                   f"{self.activations_teacher[i]!r} (activations_teacher[{i}]) did not run in "
                                   f"its forward pass; hook a layer that the teacher's forward uses")

    def _blend(self) -> None:
        self._check_hooked_layers()
        batch = self._batch
        pred = self.pred
        ref = pred if isinstance(pred, torch.Tensor) else _first_tensor([pred])
        device_type = ref.device.type if ref is not None else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            pred = _to_loss_dtype(pred)
            teacher_pred = _to_loss_dtype(batch.teacher_pred,
                                          pred.dtype if isinstance(pred, torch.Tensor) and pred.is_floating_point()
                                          else None)
            fm_s, fm_t = {}, {}
            if self.activations_student:
                keys_s, keys_t = _unique_keys(self.activations_student), _unique_keys(self.activations_teacher)
                for ks, kt, s, t in zip(keys_s, keys_t, batch.fm_s, batch.fm_t):
                    # Features keep the student's precision (bf16/fp16 under autocast: no upcast
                    # copies; the losses accumulate in fp32); the teacher's follow the student's.
                    fm_s[ks] = s
                    fm_t[kt] = _to_loss_dtype(t, s.dtype if isinstance(s, torch.Tensor) and s.is_floating_point()
                                              else None)
            kd = self._fit.loss_fn(pred=pred, teacher_pred=teacher_pred, fm_s=fm_s, fm_t=fm_t, target=self.y)
        loss_grad = self.learn.loss_grad
        if not isinstance(kd, torch.Tensor):
            kd = torch.as_tensor(kd, dtype=loss_grad.dtype, device=loss_grad.device)
        elif kd.dtype != loss_grad.dtype:
            kd = kd.to(loss_grad.dtype)
        self.learn.loss_grad = torch.lerp(loss_grad, kd, self.current_weight)
        self.learn.loss = self.learn.loss_grad.clone()
