"""Layers by name, and the student/teacher layer pairs to distil: fasterai's
``get_model_layers``, ``get_module_by_name`` and ``match_feature_layers``. Only torch is
needed (the fastai callback uses them; so can any training loop)::

    from kdfast.layers import match_feature_layers
    pairs = match_feature_layers(student, teacher, torch.randn(1, 3, 64, 64))
    # {'student': ['conv1', 'layer1', ...], 'teacher': ['0.0', '0.4', ...]}
"""
from __future__ import annotations

import copy
import difflib
from collections import OrderedDict
from functools import reduce

import torch
from torch import nn

__all__ = ["get_model_layers", "get_module_by_name", "match_feature_layers", "inference_copy", "OnePixelConv2d"]


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


def find_layer(root: nn.Module, name, what: str, hint: str, caller: str = "KnowledgeDistillationCallback") -> nn.Module:
    """``root``'s submodule called ``name`` (``model.`` and DDP's ``module.`` prefixes
    optional, DataParallel / DDP wrappers looked through), or an error naming the closest
    existing names. ``what`` names the argument, ``hint`` the model, ``caller`` the API."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"{caller}: {what} must be a layer name (a non-empty string like 'layer1' or '0.4'), "
                        f"got {name!r}")
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
    raise ValueError(f"{caller}: {problem}; {suggestion}. List every name with get_model_layers(model), or "
                     f"pair layers automatically with match_feature_layers(student, teacher, sample_input)")


def first_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None for a model without."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


# ---------------------------------------------------------------------------------------------
# Automatic layer pairs

# Layers whose output is another layer's output seen again (fasterai skips the same types).
_SKIPPED = (nn.ReLU, nn.ReLU6, nn.BatchNorm2d, nn.Dropout, nn.Identity)


def _call_model(model: nn.Module, sample_input):
    device = first_device(model)

    def move(t):
        return t.to(device) if isinstance(t, torch.Tensor) and device is not None else t
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
# A frozen teacher for inference

def tensor_state(t: torch.Tensor) -> tuple:
    """What identifies a tensor's current values without reading them: its storage, version
    counter (bumped by in-place updates such as an optimizer step; inference tensors have
    none), dtype, device and strides. What is derived from a weight is reused while it holds."""
    version = None if t.is_inference() else t._version
    return t.data_ptr(), version, t.dtype, t.device, t.stride()


class OnePixelConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose one-pixel outputs are one matrix product (the layers of
    ``inference_copy``; any other output is ``nn.Conv2d``'s).

    When the output is 1×1 (ResNet's last stage on 32×32 images: a 3×3, padding-1 convolution
    of a 1×1 map), the window sits at one place and its taps outside the input see padding
    zeros, so with the visible rows ``[0, h)`` and columns ``[0, w)`` (``h = min(H, k_h - p_h)``)

        y[n, o] = b[o] + Σ_{c, i < h, j < w} W[o, c, p_h + i, p_w + j] · x[n, c, i, j]

    a [N, C·h·w] × [C·h·w, O] product. oneDNN's bfloat16 convolution of 64 one-pixel 512-channel
    maps with a 3×3 kernel took 3.2 ms on a 2-core AMX Xeon, the product of its visible taps
    about 0.05 ms: ResNet-18's forward pass on 64 32×32 images went from 21 ms to 8 ms (bf16,
    channels_last). Only the summation order differs from the convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        visible = self._visible_window(x)
        if visible is None:
            return super().forward(x)
        h, w = visible
        n, k = x.shape[0], self.in_channels * h * w
        y = nn.functional.linear(x[:, :, :h, :w].reshape(n, k), self._visible_weight(h, w), self.bias)
        return y.reshape(n, self.out_channels, 1, 1)

    def _visible_weight(self, h: int, w: int) -> torch.Tensor:
        """The taps the input meets, [O, C·h·w], kept while the weight stays the same tensor
        (gathering the centre tap of a 3×3 kernel reads all of it: 4.7 MB at 512 channels in
        bf16, about a third of the product's time when done at every call)."""
        (ph, pw), weight = self.padding, self.weight
        taps = lambda: weight[:, :, ph:ph + h, pw:pw + w].reshape(self.out_channels, self.in_channels * h * w)  # noqa: E731
        if torch.compiler.is_compiling() or weight.requires_grad:
            return taps()
        key = (h, w, tensor_state(weight))
        cached = self.__dict__.get("_taps")
        if cached is None or cached[0] != key:
            cached = (key, taps().contiguous())
            self.__dict__["_taps"] = cached
        return cached[1]

    def _visible_window(self, x: torch.Tensor) -> tuple[int, int] | None:
        """(h, w) of the input the one output pixel's window covers; None when the output is
        not one pixel or the layer is not a plain dense convolution (groups, dilation, padding
        by reflection or by a string rule)."""
        if (x.dim() != 4 or self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros"
                or isinstance(self.padding, str)):
            return None
        (H, W), (kh, kw), (sh, sw), (ph, pw) = x.shape[-2:], self.kernel_size, self.stride, self.padding
        if H + 2 * ph < kh or W + 2 * pw < kw or (H + 2 * ph - kh) // sh != 0 or (W + 2 * pw - kw) // sw != 0:
            return None  # no output or more than one pixel
        return min(H, kh - ph), min(W, kw - pw)


def inference_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen copy of ``model`` for inference (e.g. a teacher): eval mode, no
    ``requires_grad``, in ``dtype`` when given, its plain ``nn.Conv2d`` layers computing
    one-pixel outputs as one matrix product (``OnePixelConv2d``; subclasses of ``nn.Conv2d``
    keep their own forward). Layer names are the model's (hooks by name work on the copy);
    the model itself is not changed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"inference_copy: model must be a torch.nn.Module, got {type(model).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"inference_copy: dtype must be a floating torch.dtype (e.g. torch.bfloat16) or None "
                        f"(keep the model's), got {dtype!r}")
    frozen = copy.deepcopy(model)
    if dtype is not None:
        frozen.to(dtype)
    for module in frozen.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = OnePixelConv2d
    return frozen.eval().requires_grad_(False)
