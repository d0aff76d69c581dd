"""Input checks with errors written for the user: what was wrong, what was seen, the fix."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .ops._reduction import REDUCTIONS


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in x.shape) + "]"


def check_tensor(x, name: str, op: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} has dtype {x.dtype}; distillation losses need floating-point "
                        f"tensors (logits or features), e.g. {name}.float()")
    if x.numel() == 0:
        raise ValueError(f"{op}: {name} is empty (shape {_shape(x)}); pass a non-empty batch")
    return x


def check_pair(s, t, op: str, s_name: str, t_name: str, same_shape: bool = True) -> None:
    check_tensor(s, s_name, op)
    check_tensor(t, t_name, op)
    if s.device != t.device:
        raise ValueError(f"{op}: {s_name} is on {s.device} and {t_name} on {t.device}; "
                         f"move the teacher's outputs to the student's device")
    if same_shape and s.shape != t.shape:
        raise ValueError(f"{op}: {s_name} has shape {_shape(s)} and {t_name} {_shape(t)}; they must match "
                         f"(same batch and, for logits, the same number of classes)")
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"{op}: {s_name} has batch size {s.shape[0]} and {t_name} {t.shape[0]}; "
                         f"student and teacher must see the same batch")


def check_dim(x: torch.Tensor, dim: int, op: str, name: str) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{op}: dim={dim} is out of range for {name} of shape {_shape(x)} "
                         f"(valid: {-x.dim()} to {x.dim() - 1})")
    return dim % x.dim()


def check_temperature(T, op: str) -> float:
    if isinstance(T, torch.Tensor):
        if T.numel() != 1:
            raise ValueError(f"{op}: T must be a number, got a tensor of shape {_shape(T)}")
        T = T.item()
    if not isinstance(T, (int, float)) or isinstance(T, bool) or not math.isfinite(T) or T <= 0:
        raise ValueError(f"{op}: temperature T must be a finite number > 0, got {T!r}; "
                         f"T=1 is the plain softmax, distillation commonly uses 2 to 8")
    return float(T)


def check_power(p, op: str, what: str = "") -> float:
    """The one rule for an exponent or norm ``p`` (attention maps, similarity's row norm):
    a finite number > 0, or a one-element tensor holding one."""
    if isinstance(p, torch.Tensor) and p.numel() == 1:
        p = p.item()
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not math.isfinite(p) or p <= 0:
        raise ValueError(f"{op}: p must be a number > 0{what}, got {p!r}")
    return float(p)


def check_reduction(reduction: str, op: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: unknown reduction {reduction!r}; choose one of {', '.join(map(repr, REDUCTIONS))}")
    return reduction


def check_target(target, logits: torch.Tensor, dim: int, op: str, ignore_index: int = -100,
                 num_classes: int | None = None):
    """target: integer class indices, one per row of ``logits`` (its shape without ``dim``);
    with ``num_classes``, each must be a class or ``ignore_index``."""
    if target is None:
        return None
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{op}: target must be a tensor of class indices, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"{op}: target must hold integer class indices, got dtype {target.dtype}; "
                        f"use target.long() (for one-hot targets: target.argmax(dim))")
    rows_shape = logits.shape[:dim] + logits.shape[dim + 1:]
    if target.shape != rows_shape:
        if target.numel() != math.prod(rows_shape):
            raise ValueError(f"{op}: target has shape {_shape(target)} but the logits {_shape(logits)} with "
                             f"dim={dim} have rows of shape [{', '.join(map(str, rows_shape))}]; "
                             f"pass one class index per row")
        target = target.reshape(rows_shape)
    if target.device != logits.device:
        raise ValueError(f"{op}: target is on {target.device} and the logits on {logits.device}")
    if num_classes is not None and target.device.type == "cpu" and not torch.compiler.is_compiling():
        # (Checked eagerly on the CPU only: on a GPU this would wait for the device. The kernels
        # check too: the CPU kernel raises, the GPU kernels give the row a NaN loss.)
        bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
        if bool(bad.any()):
            raise ValueError(f"{op}: target holds class index {int(target[bad][0])} outside [0, {num_classes}) "
                             f"for logits with {num_classes} classes")
    return target


def check_decoupled(logits: torch.Tensor, target, dim: int, op: str) -> int:
    """DecoupledKD's extra requirements: labels, and at least 2 classes along ``dim``
    (already checked). Returns the number of classes."""
    if target is None:
        raise ValueError(f"{op}: DecoupledKD requires `target` labels. Use SoftTarget for label-free distillation.")
    num_classes = logits.shape[dim]
    if num_classes < 2:
        raise ValueError(f"{op}: logits of shape {tuple(logits.shape)} have {num_classes} class along "
                         f"dim={dim}; decoupling target and non-target classes needs at least 2")
    return num_classes


def check_feature_maps(name_s: str, f_s, name_t: str, f_t, pool: bool, op: str) -> bool:
    """One attention-transfer layer pair: maps [B, C, *spatial] on one device, one batch.
    Returns whether they need pooling to one spatial size (allowed by ``pool``)."""
    check_pair(f_s, f_t, op, name_s, name_t, same_shape=False)
    for name, f in ((name_s, f_s), (name_t, f_t)):
        if f.dim() < 3:
            raise ValueError(f"{op}: {name} has shape {tuple(f.shape)}; it needs feature maps [B, C, H, W] "
                             f"(or [B, C, *spatial]) to build spatial attention")
    if f_s.shape[2:] == f_t.shape[2:]:
        return False
    if not pool:
        raise ValueError(f"{op}: spatial sizes differ: {name_s} {tuple(f_s.shape)} vs {name_t} {tuple(f_t.shape)}; "
                         f"pair layers of the same resolution (kdfast.layers.match_feature_layers finds them), "
                         f"or pass pool=True to average-pool the larger map to the smaller one's size")
    if f_s.dim() != f_t.dim() or f_s.dim() > 5:
        raise ValueError(f"{op}: pool=True needs maps with the same number of spatial dims (1 to 3), got "
                         f"{name_s} {tuple(f_s.shape)} and {name_t} {tuple(f_t.shape)}")
    return True


def check_map_lists(f_s, f_t, op: str) -> list[tuple[str, torch.Tensor, str, torch.Tensor]]:
    """attention_transfer's f_s, f_t: one pair of maps, or equally long lists of them,
    as named pairs (names for errors)."""
    if isinstance(f_s, torch.Tensor) or isinstance(f_t, torch.Tensor):
        return [("f_s", f_s, "f_t", f_t)]
    f_s, f_t = list(f_s), list(f_t)
    if len(f_s) != len(f_t) or not f_s:
        raise ValueError(f"{op}: {len(f_s)} student maps and {len(f_t)} teacher maps; pass one teacher map per "
                         f"student map (at least one pair)")
    return [(f"f_s[{i}]", s, f"f_t[{i}]", t) for i, (s, t) in enumerate(zip(f_s, f_t))]


def check_embeddings(e_s, e_t, op: str) -> None:
    """Relational losses: student and teacher embeddings [B, ...] of one batch of >= 2."""
    check_pair(e_s, e_t, op, "e_s", "e_t", same_shape=False)
    if e_s.shape[0] < 2:
        raise ValueError(f"{op}: a batch of {e_s.shape[0]} sample; relational losses compare samples with "
                         f"each other and need a batch of at least 2")


def check_layer_dicts(fm_s, fm_t, op: str) -> list[tuple[str, torch.Tensor, str, torch.Tensor]]:
    """Pair hooked activations in order: fasterai's ``zip(fm_s, fm_t)`` with clear errors."""
    for name, fm in (("fm_s", fm_s), ("fm_t", fm_t)):
        if fm is None:
            raise ValueError(f"{op}: {name} is None; this loss compares intermediate features: pass "
                             f"activations_student / activations_teacher to the callback, or dicts of "
                             f"tensors when calling the loss directly")
        if not isinstance(fm, (Mapping, Sequence)) or isinstance(fm, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a dict (layer name -> activation) or a list of tensors, "
                            f"got {type(fm).__name__}")
    items_s = list(fm_s.items()) if isinstance(fm_s, Mapping) else [(str(i), v) for i, v in enumerate(fm_s)]
    items_t = list(fm_t.items()) if isinstance(fm_t, Mapping) else [(str(i), v) for i, v in enumerate(fm_t)]
    if len(items_s) != len(items_t):
        raise ValueError(f"{op}: {len(items_s)} student layers ({', '.join(k for k, _ in items_s)}) but "
                         f"{len(items_t)} teacher layers ({', '.join(k for k, _ in items_t)}); "
                         f"pair every student layer with one teacher layer")
    if not items_s:
        raise ValueError(f"{op}: fm_s and fm_t are empty; no layers were hooked (check the layer names)")
    return [(ks, vs, kt, vt) for (ks, vs), (kt, vt) in zip(items_s, items_t)]


def check_callback_arguments(teacher, loss, weight, schedule, student_names: list, teacher_names: list) -> None:
    """KnowledgeDistillationCallback's arguments (layer names are resolved separately)."""
    op = "KnowledgeDistillationCallback"
    if not isinstance(teacher, torch.nn.Module):
        raise TypeError(f"{op}: teacher must be an nn.Module (e.g. teacher_learner.model), got "
                        f"{type(teacher).__name__}")
    if not callable(loss):
        raise TypeError(f"{op}: loss must be a distillation loss (SoftTarget, Attention, ...) or a function "
                        f"loss(pred=, teacher_pred=, fm_s=, fm_t=, target=), got {loss!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"{op}: weight must be a number (the blend is (1-w)·loss + w·KD), got {weight!r}")
    if schedule is not None and not (hasattr(schedule, "progress") or callable(schedule)):
        raise TypeError(f"{op}: schedule must be a Schedule (cos, lin, ...) or a function of pct_train, got "
                        f"{schedule!r}")
    if len(student_names) != len(teacher_names):
        raise ValueError(f"{op}: {len(student_names)} student layer(s) {student_names} but {len(teacher_names)} "
                         f"teacher layer(s) {teacher_names}; pass one teacher layer per student layer, in "
                         f"matching order (match_feature_layers finds pairs)")


def check_teacher_options(inference_mode, channels_last, compile_, dtype, teacher_names: list) -> None:
    """KnowledgeDistillationCallback's teacher options."""
    op = "KnowledgeDistillationCallback"
    if not isinstance(inference_mode, bool):
        raise TypeError(f"{op}: teacher_inference_mode must be True or False, got {inference_mode!r}")
    if channels_last is not None and not isinstance(channels_last, bool):
        raise TypeError(f"{op}: teacher_channels_last must be True, False or None (follow the student's memory "
                        f"format), got {channels_last!r}")
    if not isinstance(compile_, (bool, dict)):
        raise TypeError(f"{op}: teacher_compile must be True, False or a dict of torch.compile arguments (e.g. "
                        f"{{'mode': 'max-autotune'}}), got {compile_!r}")
    if compile_ is not False and teacher_names:
        raise ValueError(f"{op}: teacher_compile distils the teacher's logits only, but activations_teacher="
                         f"{teacher_names} are hooked (a compiled module does not call hooks added after it was "
                         f"compiled); pass teacher_compile=False to hook teacher layers")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{op}: teacher_dtype must be a floating torch.dtype (e.g. torch.bfloat16) or None (the "
                        f"teacher's own), got {dtype!r}")
