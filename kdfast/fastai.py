"""fastai integration: fasterai's ``KnowledgeDistillationCallback``, ``match_feature_layers``,
``get_model_layers`` and ``get_module_by_name``, with the same arguments and numbers.

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
- validation: the teacher does not run and ``valid_loss`` is the student's plain loss,
  comparable with a student trained alone (``blend_valid=True`` restores fasterai's
  blended validation loss); ``get_preds`` without labels works;
- layer pairs follow the order of the user's lists; names resolve with or without the
  ``model.`` and DDP's ``module.`` prefixes, and a name that does not exist is an error
  naming the closest ones; hooks are removed when fit ends, is cancelled or fails;
  hooked activations are dropped as soon as the loss is computed.
"""
from __future__ import annotations

import difflib
import functools
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import reduce

import torch
from torch import nn

try:
    from fastai.callback.core import Callback
except ImportError as e:  # pragma: no cover - fastai is optional for kdfast
    raise ImportError("kdfast.fastai needs fastai: pip install fastai (or kdfast[fastai])") from e

from .losses import _INPUTS, DistillationLoss

__all__ = ["KnowledgeDistillationCallback", "get_model_layers", "get_module_by_name", "match_feature_layers"]


# ---------------------------------------------------------------------------------------------
# Layers by name

def get_model_layers(model: nn.Module, get_layer_repr: bool = False) -> list[str] | dict[str, str]:
    """Every submodule's dotted name, depth first (fasterai's order); with
    ``get_layer_repr`` a dict name -> ``repr(module)``."""
    layers: list[str] | dict[str, str] = OrderedDict() if get_layer_repr else []

    def walk(net, prefix):
        for name, layer in getattr(net, "_modules", {}).items():
            if layer is None:
                continue
            full = ".".join(prefix + [name])
            if get_layer_repr:
                layers[full] = repr(layer)
            else:
                layers.append(full)
            walk(layer, prefix + [name])

    walk(model, [])
    return layers


def get_module_by_name(module: nn.Module, access_string: str) -> nn.Module | None:
    """The submodule at a dotted path (``'layer1.0.conv1'``, ``'0.4'``), or None (fasterai's)."""
    try:
        return reduce(getattr, access_string.split(sep="."), module)
    except AttributeError:
        return None


_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def _name_candidates(name: str):
    """The name as given, then without leading ``model.`` / ``module.`` prefixes (a name
    taken from a Learner, or from a DDP-wrapped model)."""
    yield name
    stripped = name
    while True:
        for prefix in ("model.", "module."):
            if stripped.startswith(prefix):
                stripped = stripped[len(prefix):]
                yield stripped
                break
        else:
            return


def _resolve_layer(root: nn.Module, name, what: str, hint: str) -> nn.Module:
    """``root``'s submodule called ``name``, or an error naming the closest existing names."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"KnowledgeDistillationCallback: {what} must be a layer name (a non-empty string like "
                        f"'layer1' or '0.4'), got {name!r}")
    roots = [root]
    if isinstance(root, _WRAPPERS):
        roots.append(root.module)
    for candidate in _name_candidates(name):
        for r in roots:
            found = get_module_by_name(r, candidate)
            if isinstance(found, nn.Module):
                return found
    names = get_model_layers(roots[-1])
    bare = list(_name_candidates(name))[-1]
    close = difflib.get_close_matches(bare, names, n=3, cutoff=0.5)
    found = get_module_by_name(roots[-1], name)
    if found is not None and not isinstance(found, nn.Module):
        problem = f"{what} = {name!r} is a {type(found).__name__}, not a layer of the {hint}"
    else:
        problem = f"{what} = {name!r} is not a layer of the {hint}"
    suggestion = (f"closest names: {', '.join(map(repr, close))}" if close else
                  f"its layers start {', '.join(map(repr, names[:6]))}{', ...' if len(names) > 6 else ''}")
    raise ValueError(f"KnowledgeDistillationCallback: {problem}; {suggestion}. List every name with "
                     f"get_model_layers(model), or pair layers automatically with "
                     f"match_feature_layers(student, teacher, sample_input)")


# ---------------------------------------------------------------------------------------------
# Automatic layer pairs

# Layers whose output is another layer's output seen again (fasterai skips the same types).
_SKIPPED = (nn.ReLU, nn.ReLU6, nn.BatchNorm2d, nn.Dropout, nn.Identity)


def _first_device(model: nn.Module):
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def _call_model(model: nn.Module, sample_input):
    device = _first_device(model)
    move = (lambda t: t.to(device) if isinstance(t, torch.Tensor) and device is not None else t)
    if isinstance(sample_input, (tuple, list)):
        return model(*[move(t) for t in sample_input])
    return model(move(sample_input))


def _spatial_shapes(model: nn.Module, sample_input) -> dict[str, tuple[int, ...]]:
    """Layer name -> (H, W) of its 4-D output, in the order the layers first run. The model
    runs once in eval mode without gradient (BatchNorm works with a batch of 1, running
    statistics untouched), then every module gets back the train/eval mode it had."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if name == "" or isinstance(module, _SKIPPED):
            continue

        def record(mod, inputs, output, name=name):
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                shapes[name] = tuple(output.shape[2:])
        handles.append(module.register_forward_hook(record))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            _call_model(model, sample_input)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return shapes


def _best_at_each_resolution(shapes: dict[str, tuple[int, ...]]) -> dict[tuple[int, ...], str]:
    """At each resolution the shallowest layer; among equally shallow ones the last to run."""
    best: dict[tuple[int, ...], tuple[str, int]] = {}
    for name, shape in shapes.items():
        depth = name.count(".")
        if shape not in best or depth <= best[shape][1]:
            best[shape] = (name, depth)
    return {res: name for res, (name, _) in best.items()}


def match_feature_layers(student_model: nn.Module, teacher_model: nn.Module, sample_input) -> dict[str, list[str]]:
    """Pairs of student/teacher layers with the same spatial resolution, largest first:
    ``{'student': [...], 'teacher': [...]}``, ready for ``KnowledgeDistillationCallback``.

    Each model runs once on ``sample_input`` (a tensor, or a tuple of inputs; moved to each
    model's device) in eval mode; at each output resolution (H, W) the shallowest layer is
    taken (the last to run among equally shallow ones); 1×1 resolutions are left out. Models
    keep their train/eval modes. Same result as fasterai's function.
    """
    s_best = _best_at_each_resolution(_spatial_shapes(student_model, sample_input))
    t_best = _best_at_each_resolution(_spatial_shapes(teacher_model, sample_input))
    shape = (list(sample_input.shape) if isinstance(sample_input, torch.Tensor)
             else [list(getattr(t, "shape", [])) for t in sample_input])
    for who, best in (("student", s_best), ("teacher", t_best)):
        if not best:
            raise ValueError(f"match_feature_layers: the {who} produced no 4-D activations [B, C, H, W] on a "
                             f"sample_input of shape {shape}; it pairs convolutional feature maps only. For "
                             f"other models name the layers yourself (get_model_layers(model) lists them)")
    shared = sorted(set(s_best) & set(t_best), key=lambda r: tuple(r), reverse=True)
    shared = [r for r in shared if r[0] > 1]  # 1×1 maps (after global pooling) carry no spatial pattern
    if not shared:
        def fmt(best):
            return ", ".join("×".join(map(str, r)) for r in sorted(best, reverse=True))
        raise ValueError(f"match_feature_layers: the student and the teacher share no spatial resolution above "
                         f"1×1 on a sample_input of shape {shape} (student: {fmt(s_best)}; teacher: "
                         f"{fmt(t_best)}). Use a sample input of the size the models train on, or name the "
                         f"layer pairs yourself (get_model_layers(model) lists them)")
    return {"student": [s_best[r] for r in shared], "teacher": [t_best[r] for r in shared]}


# ---------------------------------------------------------------------------------------------
# The callback

def _as_loss_function(loss):
    """A kdfast loss class (or functools.partial of one with settings only) becomes one
    configured module, built once instead of at every batch; anything else is called as is."""
    if isinstance(loss, type) and issubclass(loss, DistillationLoss):
        return loss()
    if (isinstance(loss, functools.partial) and isinstance(loss.func, type)
            and issubclass(loss.func, DistillationLoss) and not loss.args and _INPUTS.isdisjoint(loss.keywords)):
        return loss.func(**loss.keywords)
    return loss


def _loss_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _to_loss_dtype(x, dtype: torch.dtype | None = None):
    """Floating tensors (also inside tuples, lists, dicts) in ``dtype``, by default float32
    (float64 kept)."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            return x
        want = dtype or _loss_dtype(x)
        return x if x.dtype == want else x.to(want)
    if isinstance(x, Mapping):
        return {k: _to_loss_dtype(v, dtype) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple
        return type(x)(*[_to_loss_dtype(v, dtype) for v in x])
    if isinstance(x, (tuple, list)):
        return type(x)(_to_loss_dtype(v, dtype) for v in x)
    return x


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


def _listify(names) -> list:
    if names is None:
        return []
    if isinstance(names, str):
        return [names]
    if isinstance(names, Sequence):
        return list(names)
    return list(names) if hasattr(names, "__iter__") else [names]


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

    When the weight is 0 (e.g. the first batch under ``cos``), the teacher is not run.
    """

    order = 0

    def __init__(self, teacher: nn.Module, loss: Callable, activations_student: str | list[str] | None = None,
                 activations_teacher: str | list[str] | None = None, weight: float = 0.5,
                 schedule=None, blend_valid: bool = False):
        self._st = types.SimpleNamespace(learn=None, attached=False, for_validation=False, capture=False,
                                         teacher_running=False, fm_s=[], fm_t=[], calls_s=[], teacher_pred=None,
                                         handles=[], teacher_modes=[], teacher_to_contiguous=False,
                                         warned_repeat=set(), device=None)
        if hasattr(teacher, "model") and isinstance(getattr(teacher, "model"), nn.Module) \
                and not isinstance(teacher, nn.Module):
            teacher = teacher.model  # a fastai Learner
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"KnowledgeDistillationCallback: teacher must be an nn.Module (e.g. teacher_learner.model), "
                            f"got {type(teacher).__name__}")
        if not callable(loss):
            raise TypeError(f"KnowledgeDistillationCallback: loss must be a distillation loss (SoftTarget, Attention, "
                            f"...) or a function loss(pred=, teacher_pred=, fm_s=, fm_t=, target=), got {loss!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"KnowledgeDistillationCallback: weight must be a number (the blend is "
                            f"(1-w)·loss + w·KD), got {weight!r}")
        if schedule is not None and not (hasattr(schedule, "progress") or callable(schedule)):
            raise TypeError(f"KnowledgeDistillationCallback: schedule must be a Schedule (cos, lin, ...) or a "
                            f"function of pct_train, got {schedule!r}")
        student_names, teacher_names = _listify(activations_student), _listify(activations_teacher)
        if len(student_names) != len(teacher_names):
            raise ValueError(f"KnowledgeDistillationCallback: {len(student_names)} student layer(s) {student_names} "
                             f"but {len(teacher_names)} teacher layer(s) {teacher_names}; pass one teacher layer "
                             f"per student layer, in matching order (match_feature_layers finds pairs)")
        self.teacher, self.loss = teacher, loss
        self.activations_student = student_names or None
        self.activations_teacher = teacher_names or None
        self.weight, self.schedule, self.blend_valid = float(weight), schedule, bool(blend_valid)
        self.current_weight = float(weight)
        for i, name in enumerate(teacher_names):  # fail now rather than at fit
            _resolve_layer(teacher, name, f"activations_teacher[{i}]", "teacher")

    # fastai attaches a callback by setting ``cb.learn`` and detaches it (also when fit
    # raises) by setting it to None: that is where hooks of a failed fit are removed.
    @property
    def learn(self):
        st = self.__dict__.get("_st")
        return st.learn if st is not None else None

    @learn.setter
    def learn(self, value):
        st = self._st
        if value is not st.learn:
            self._detach()
        st.learn = value

    # fasterai's attributes, read-only views of the current batch
    @property
    def stored_activation_student(self) -> dict:
        return self._activations(self.activations_student, self._st.fm_s)

    @property
    def stored_activation_teacher(self) -> dict:
        return self._activations(self.activations_teacher, self._st.fm_t)

    @staticmethod
    def _activations(names, slots) -> dict:
        if not names or not slots:
            return {}
        return {k: v for k, v in zip(_unique_keys(names), slots) if v is not None}

    # -- set up and tear down ------------------------------------------------------------------
    def _attach(self) -> None:
        self._detach()
        st = self._st
        student = self.learn.model
        names_s, names_t = self.activations_student or [], self.activations_teacher or []
        if len(names_s) != len(names_t):
            raise ValueError(f"KnowledgeDistillationCallback: {len(names_s)} student layer(s) but {len(names_t)} "
                             f"teacher layer(s); pass one teacher layer per student layer")
        modules_s = [_resolve_layer(student, n, f"activations_student[{i}]", "student (learn.model)")
                     for i, n in enumerate(names_s)]
        modules_t = [_resolve_layer(self.teacher, n, f"activations_teacher[{i}]", "teacher")
                     for i, n in enumerate(names_t)]
        st.fm_s, st.fm_t, st.calls_s = [None] * len(names_s), [None] * len(names_t), [0] * len(names_s)
        for i, m in enumerate(modules_s):
            st.handles.append(m.register_forward_hook(self._student_hook(i)))
        for i, m in enumerate(modules_t):
            st.handles.append(m.register_forward_hook(self._teacher_hook(i)))
        st.teacher_modes = [(m, m.training) for m in self.teacher.modules()]
        self.teacher.eval()
        if _is_channels_last(student) and not _is_channels_last(self.teacher):
            self.teacher.to(memory_format=torch.channels_last)
            st.teacher_to_contiguous = True
        self._loss_fn = _as_loss_function(self.loss)
        st.attached = True

    def _detach(self) -> None:
        st = self.__dict__.get("_st")
        if st is None:
            return
        for h in st.handles:
            h.remove()
        st.handles = []
        self._clear()
        for m, training in st.teacher_modes:
            m.training = training
        st.teacher_modes = []
        if st.teacher_to_contiguous:
            self.teacher.to(memory_format=torch.contiguous_format)
            st.teacher_to_contiguous = False
        st.attached = st.for_validation = False

    def _clear(self) -> None:
        st = self._st
        st.capture = st.teacher_running = False
        st.fm_s = [None] * len(st.fm_s)
        st.fm_t = [None] * len(st.fm_t)
        st.calls_s = [0] * len(st.calls_s)
        st.teacher_pred = None

    def _student_hook(self, i: int):
        st = self._st

        def hook(module, inputs, output):
            if st.capture and not st.teacher_running:
                st.fm_s[i] = output
                st.calls_s[i] += 1
        return hook

    def _teacher_hook(self, i: int):
        st = self._st

        def hook(module, inputs, output):
            if st.teacher_running:
                st.fm_t[i] = output
        return hook

    # -- fastai events -------------------------------------------------------------------------
    def before_fit(self) -> None:
        self._attach()

    def after_fit(self) -> None:
        self._detach()

    def before_validate(self) -> None:
        # validate() / get_preds() outside fit: hooks are only needed to blend the loss
        if self.blend_valid and not self._st.attached:
            self._attach()
            self._st.for_validation = True

    def after_validate(self) -> None:
        if self._st.for_validation:
            self._detach()

    def before_batch(self) -> None:
        if self.schedule is not None:
            progress = self.schedule.progress(self.pct_train) if hasattr(self.schedule, "progress") \
                else self.schedule(self.pct_train)
            self.current_weight = self.weight * float(progress)
        st = self._st
        self._clear()
        st.capture = bool(st.attached and (self.training or self.blend_valid) and len(self.yb)
                          and self.current_weight != 0)

    def after_pred(self) -> None:
        """Run the teacher on the same inputs, in the same autocast context as the student."""
        st = self._st
        if not st.capture:
            return
        teacher = self.teacher
        x = _first_tensor(self.xb)
        if x is not None and x.device != st.device:
            device = _first_device(teacher)
            if device is not None and device != x.device:
                teacher.to(x.device)
            st.device = x.device
        if teacher.training:
            teacher.eval()
        st.teacher_running = True
        try:
            with torch.no_grad():
                st.teacher_pred = teacher(*self.xb)
        finally:
            st.teacher_running = False

    def after_loss(self) -> None:
        st = self._st
        if not st.capture:
            return
        try:
            self._blend()
        finally:
            self._clear()  # the student's graph keeps what backward needs; drop the rest now

    def after_batch(self) -> None:
        self._clear()

    def after_cancel_batch(self) -> None:
        self._clear()

    # -- the loss ------------------------------------------------------------------------------
    def _blend(self) -> None:
        st = self._st
        for i, calls in enumerate(st.calls_s):
            name = self.activations_student[i]
            if calls == 0:
                raise RuntimeError(f"KnowledgeDistillationCallback: the student's layer {name!r} "
                                   f"(activations_student[{i}]) did not run in the forward pass; hook a layer "
                                   f"that the model's forward uses")
            if calls > 1 and name not in st.warned_repeat:
                st.warned_repeat.add(name)
                warnings.warn(f"KnowledgeDistillationCallback: the student's layer {name!r} ran {calls} times in "
                              f"one forward pass; its last output is distilled", stacklevel=2)
        for i, f in enumerate(st.fm_t):
            if f is None:
                raise RuntimeError(f"KnowledgeDistillationCallback: the teacher's layer "
                                   f"{self.activations_teacher[i]!r} (activations_teacher[{i}]) did not run in "
                                   f"its forward pass; hook a layer that the teacher's forward uses")
        pred = self.pred
        ref = pred if isinstance(pred, torch.Tensor) else _first_tensor([pred])
        device_type = ref.device.type if ref is not None else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            pred = _to_loss_dtype(pred)
            teacher_pred = _to_loss_dtype(st.teacher_pred,
                                          pred.dtype if isinstance(pred, torch.Tensor) and pred.is_floating_point()
                                          else None)
            fm_s, fm_t = {}, {}
            if self.activations_student:
                keys_s, keys_t = _unique_keys(self.activations_student), _unique_keys(self.activations_teacher)
                for ks, kt, s, t in zip(keys_s, keys_t, st.fm_s, st.fm_t):
                    # Features keep the student's precision (bf16/fp16 under autocast: no upcast
                    # copies; the losses accumulate in fp32); the teacher's follow the student's.
                    fm_s[ks] = s
                    fm_t[kt] = _to_loss_dtype(t, s.dtype if isinstance(s, torch.Tensor) and s.is_floating_point()
                                              else None)
            kd = self._loss_fn(pred=pred, teacher_pred=teacher_pred, fm_s=fm_s, fm_t=fm_t, target=self.y)
        loss_grad = self.learn.loss_grad
        if not isinstance(kd, torch.Tensor):
            kd = torch.as_tensor(kd, dtype=loss_grad.dtype, device=loss_grad.device)
        elif kd.dtype != loss_grad.dtype:
            kd = kd.to(loss_grad.dtype)
        self.learn.loss_grad = torch.lerp(loss_grad, kd, self.current_weight)
        self.learn.loss = self.learn.loss_grad.clone()
