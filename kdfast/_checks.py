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
    if t.requires_grad and not s.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: {t_name} requires grad and {s_name} does not; the teacher's side is a target "
                         f"(kdfast never backpropagates into it), so this loss would train nothing. Were the "
                         f"arguments swapped? The student's tensor comes first")


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


def check_weight(value, name: str, op: str, what: str = "") -> float:
    """The one rule for a loss's weight, margin or epsilon: a finite number >= 0, or a
    one-element tensor holding one."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{op}: {name} must be a finite number >= 0{what}, got {value!r}")
    return float(value)


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
                             f"for logits with {num_classes} classes, and it is not ignore_index={ignore_index} "
                             f"(rows to leave out are labelled ignore_index)")
    return target


def check_beta(beta, op: str) -> float:
    """The JSD interpolation weight: a number in [0, 1]."""
    if isinstance(beta, torch.Tensor) and beta.numel() == 1:
        beta = beta.item()
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
        raise ValueError(f"{op}: beta must be a number in [0, 1] (the teacher's weight in the mixture "
                         f"m = beta·p_teacher + (1 - beta)·p_student; 0 is forward KL, 1 reverse KL), got {beta!r}")
    return float(beta)


def check_k(k, num_classes: int, op: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{op}: k must be a positive int (classes kept per row), got {k!r}")
    if k > num_classes:
        raise ValueError(f"{op}: k={k} is larger than the {num_classes} classes of a row; pass k <= {num_classes}")
    return k


def check_tail(tail, T: float, op: str) -> str:
    """How a sparse teacher's missing mass is treated, and whether T can be applied to it."""
    if tail not in ("bucket", "renormalize"):
        raise ValueError(f"{op}: unknown tail {tail!r}; choose 'bucket' (the mass outside the top-k is one more "
                         f"class) or 'renormalize' (both distributions restricted to the top-k)")
    if tail == "bucket" and T != 1:
        raise ValueError(f"{op}: T={T:g} with a TopK teacher and tail='bucket': the stored log-probabilities are "
                         f"at T=1, and the tail's mass at another temperature is unknown. Use T=1, or "
                         f"tail='renormalize' (re-tempers the stored top-k exactly, renormalised over them)")
    return tail


def check_topk(topk, student: torch.Tensor, dim: int, op: str, name: str = "teacher_logits"):
    """A TopK teacher for ``student`` logits with the class dim ``dim``: (indices, logprobs)."""
    indices, logprobs = topk
    for part, x in (("indices", indices), ("logprobs", logprobs)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name}.{part} must be a torch.Tensor, got {type(x).__name__}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: {name}.indices has dtype {indices.dtype}; class indices must be torch.int32 or "
                        f"torch.int64 (kdfast.topk_logits makes them), e.g. indices.long()")
    if not logprobs.is_floating_point():
        raise TypeError(f"{op}: {name}.logprobs has dtype {logprobs.dtype}; log-probabilities are floating "
                        f"point (torch.float32 or torch.bfloat16)")
    if indices.shape != logprobs.shape:
        raise ValueError(f"{op}: {name}.indices has shape {_shape(indices)} and {name}.logprobs "
                         f"{_shape(logprobs)}; they must match")
    expected = student.shape[:dim] + (indices.shape[dim] if indices.dim() == student.dim() else -1,) + \
        student.shape[dim + 1:]
    if indices.dim() != student.dim() or indices.shape != expected:
        raise ValueError(f"{op}: {name} has shape {_shape(indices)} for student_logits {_shape(student)}; a TopK "
                         f"teacher has the logits' shape with the class dim (dim={dim}) of size k")
    for part, x in (("indices", indices), ("logprobs", logprobs)):
        if x.device != student.device:
            raise ValueError(f"{op}: {name}.{part} is on {x.device} and student_logits on {student.device}")
    check_k(indices.shape[dim], student.shape[dim], op)
    if logprobs.device.type == "cpu" and not torch.compiler.is_compiling() and bool((logprobs > 0).any()):
        raise ValueError(f"{op}: {name}.logprobs holds {float(logprobs.max()):g} > 0; log-probabilities are "
                         f"<= 0 (these look like logits: kdfast.topk_logits(teacher_logits, k) makes a TopK)")
    return indices, logprobs


def check_topk_indices(indices: torch.Tensor, num_classes: int, dim: int, name: str = "teacher_logits") -> None:
    """Every row's top-k indices in [0, num_classes) and distinct; eagerly, on the CPU only
    (on a GPU this would wait for the device; the kernels give such a row a NaN loss).
    The C++ CPU kernel checks the same as it reads them (the same errors)."""
    if indices.device.type != "cpu" or torch.compiler.is_compiling():
        return
    rows = indices.movedim(dim, -1)
    low, high = torch.aminmax(rows)
    if int(low) < 0 or int(high) >= num_classes:
        bad = int(low) if int(low) < 0 else int(high)
        raise ValueError(f"{name}.indices holds class index {bad} outside [0, {num_classes}) for logits with "
                         f"{num_classes} classes")
    ordered = rows.sort(-1).values
    repeated = ordered[..., 1:] == ordered[..., :-1]
    if bool(repeated.any()):
        row = int(repeated.any(-1).reshape(-1).nonzero()[0])
        raise ValueError(f"{name}.indices repeats class {int(ordered[..., 1:][repeated][0])} in row {row} (rows "
                         f"counted in order over the dims other than the class dim); the top-k classes of a row "
                         f"must be distinct")


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


def check_embeddings(e_s, e_t, op: str, names: tuple[str, str] = ("e_s", "e_t")) -> None:
    """Relational losses: student and teacher embeddings [B, ...] of one batch of >= 2
    (``names``: the arguments' names, for errors)."""
    check_pair(e_s, e_t, op, *names, same_shape=False)
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
    check_weight(weight, "weight", op, " (the blend is (1-w)·loss + w·KD)")
    if schedule is not None and not (hasattr(schedule, "progress") or callable(schedule)):
        raise TypeError(f"{op}: schedule must be a Schedule (cos, lin, ...) or a function of pct_train, got "
                        f"{schedule!r}")
    if len(student_names) != len(teacher_names):
        raise ValueError(f"{op}: {len(student_names)} student layer(s) {student_names} but {len(teacher_names)} "
                         f"teacher layer(s) {teacher_names}; pass one teacher layer per student layer, in "
                         f"matching order (match_feature_layers finds pairs)")


def _check_head(hidden, weight, bias, op: str, who: str, names: tuple[str, str, str], rows: int | None = None):
    """A linear head: hidden states [..., H] (rows = their leading dims), weight [V, H],
    bias [V] or None, one device. Returns the hidden states as [rows, H]."""
    h_name, w_name, b_name = names
    check_tensor(hidden, h_name, op)
    check_tensor(weight, w_name, op)
    if hidden.dim() < 2:
        raise ValueError(f"{op}: {h_name} has shape {_shape(hidden)}; the {who}'s hidden states are [N, H] or "
                         f"[B, S, H] (the inputs of its LM head)")
    if weight.dim() != 2:
        raise ValueError(f"{op}: {w_name} has shape {_shape(weight)}; an LM head's weight is [V, H] "
                         f"(lm_head.weight, e.g. model.get_output_embeddings().weight)")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{op}: {h_name} has width {hidden.shape[-1]} (shape {_shape(hidden)}) but {w_name} is "
                         f"{_shape(weight)}: the weight's second dim must be the hidden width (weight [V, H], "
                         f"hidden [..., H]; pass lm_head.weight, not its transpose)")
    if weight.device != hidden.device:
        raise ValueError(f"{op}: {h_name} is on {hidden.device} and {w_name} on {weight.device}; put them on one "
                         f"device")
    if bias is not None:
        check_tensor(bias, b_name, op)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{op}: {b_name} has shape {_shape(bias)}; the head's bias is [V] = "
                             f"[{weight.shape[0]}] for {w_name} {_shape(weight)}")
        if bias.device != weight.device:
            raise ValueError(f"{op}: {b_name} is on {bias.device} and {w_name} on {weight.device}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    if rows is not None and flat.shape[0] != rows:
        raise ValueError(f"{op}: {h_name} has {flat.shape[0]} rows (shape {_shape(hidden)}) and the student "
                         f"{rows}; teacher and student must see the same tokens")
    return flat


def check_fused_linear(student_hidden, student_weight, student_bias, teacher, target, divergence, T, soft_weight,
                       hard_weight, reduction, chunk_size, tail, ignore_index, divergences, op: str):
    """fused_linear_kd's inputs, flattened to rows: (h [N, H], teacher_args (t_hidden,
    t_weight, t_bias, t_logits, indices, logprobs), target [N] or None, T, soft_weight,
    hard_weight, tail)."""
    from .topk import TopK

    h = _check_head(student_hidden, student_weight, student_bias, op, "student",
                    ("student_hidden", "student_weight", "student_bias"))
    N, V = h.shape[0], student_weight.shape[0]
    lead = student_hidden.shape[:-1]
    if divergence not in divergences:
        raise ValueError(f"{op}: unknown divergence {divergence!r}; choose one of {', '.join(map(repr, divergences))}")
    T = check_temperature(T, op)
    soft_weight = check_weight(soft_weight, "soft_weight", op, " (the term's weight in the loss)")
    hard_weight = check_weight(hard_weight, "hard_weight", op, " (the term's weight in the loss)")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{op}: reduction={reduction!r}; fused_linear_kd reduces over the tokens with 'mean' (over "
                         f"the tokens kept) or 'sum' ('none' is not available: the weight gradient is summed over "
                         f"the tokens as they are processed)")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{op}: chunk_size must be a positive int (rows per chunk) or None (the rule of "
                         f"kdfast.ops.fused_linear.default_chunk_size), got {chunk_size!r}")
    # A stand-in for the [N, V] logits (no memory) for the checks written for logits.
    logits = torch.empty((), dtype=torch.float32, device=h.device).expand(N, V)
    teacher_args = [None] * 6
    if isinstance(teacher, TopK):
        try:
            indices, logprobs = check_topk(teacher, logits.view(*lead, V), len(lead), op, "teacher")
        except ValueError as e:
            raise ValueError(f"{e} (here: the hidden states' leading dims {list(lead)} with the class dim of "
                             f"size k)") from None
        tail = check_tail(tail, T, op)
        teacher_args[4:] = [indices.reshape(N, -1), logprobs.reshape(N, -1)]
        check_topk_indices(teacher_args[4], V, 1, "teacher")
    elif isinstance(teacher, torch.Tensor):
        check_tensor(teacher, "teacher", op)
        if teacher.shape[-1] != V or teacher.numel() != N * V:
            raise ValueError(f"{op}: teacher logits have shape {_shape(teacher)}; they must be [..., V] with the "
                             f"student's tokens: {list(lead) + [V]} (or [{N}, {V}])")
        if teacher.device != h.device:
            raise ValueError(f"{op}: teacher logits are on {teacher.device} and student_hidden on {h.device}")
        teacher_args[3] = teacher.reshape(N, V)
    elif isinstance(teacher, (tuple, list)) and len(teacher) in (2, 3):
        t_bias = teacher[2] if len(teacher) == 3 else None
        t_h = _check_head(teacher[0], teacher[1], t_bias, op, "teacher",
                          ("teacher[0] (hidden states)", "teacher[1] (weight)", "teacher[2] (bias)"), rows=N)
        if teacher[1].shape[0] != V:
            raise ValueError(f"{op}: the teacher's head has {teacher[1].shape[0]} classes (teacher[1] "
                             f"{_shape(teacher[1])}) and the student's {V} (student_weight "
                             f"{_shape(student_weight)}); distillation needs one vocabulary")
        if t_h.device != h.device:
            raise ValueError(f"{op}: the teacher's hidden states are on {t_h.device} and the student's on "
                             f"{h.device}")
        teacher_args[:3] = [t_h, teacher[1], t_bias]
    else:
        length = f" of length {len(teacher)}" if isinstance(teacher, (tuple, list)) else ""
        raise TypeError(f"{op}: teacher must be (teacher_hidden, teacher_weight), (teacher_hidden, teacher_weight, "
                        f"teacher_bias), the teacher's logits [..., V] or a kdfast.TopK; got "
                        f"{type(teacher).__name__}{length}")
    if target is not None:
        target = check_target(target, logits, 1, op, ignore_index, V)
    elif hard_weight != 0:
        raise ValueError(f"{op}: hard_weight={hard_weight:g} needs target (the labels of the cross-entropy term); "
                         f"pass target, or hard_weight=0")
    return h, tuple(teacher_args), target, T, soft_weight, hard_weight, tail
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
