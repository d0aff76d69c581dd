"""The bad-input matrix: every public function and loss of kdfast x each bad input -> the
ValueError or TypeError it raises, whose message names the argument and the values seen.

tests/test_bad_inputs.py runs every cell and checks that docs/errors.md is this matrix's
table; ``python tests/bad_inputs.py`` rewrites that file after a change.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

if __name__ == "__main__":  # run as a script: this checkout's kdfast
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import kdfast  # noqa: E402
from kdfast import functional as KF  # noqa: E402
from kdfast import losses as L  # noqa: E402

NAN = float("nan")


def _t(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@dataclass
class Api:
    """How to call one public function or loss with a student and a teacher (``s``, ``t``:
    logits [4, 10], maps [2, 3, 4, 4] or embeddings [4, 8]) and parameters; ``names``: what
    its messages call the student's and the teacher's tensors."""
    name: str
    kind: str                      # "logits", "maps", "embeddings"
    call: Callable                 # call(s, t, **params)
    names: tuple[str, str]
    params: tuple[str, ...] = ()   # the bad parameters that apply: "T", "beta", "target", "weight:<name>", ...
    same_shape: bool = True        # whether student and teacher shapes must match (else widths may differ)


def _loss(cls, inputs=("pred", "teacher_pred"), layered=False):
    def call(s, t, target=None, **cfg):
        kwargs = {"fm_s": {"a": s}, "fm_t": {"a": t}} if layered else {inputs[0]: s, inputs[1]: t}
        return cls(**cfg)(**kwargs, target=target)
    return call


def _labels(n=4, classes=10):
    return torch.arange(n) % classes


def _divergence(fn):
    return lambda s, t, target=None, **kw: fn(s, t, target=target, **kw)


LOGITS = ("student_logits", "teacher_logits")
APIS = [
    Api("soft_target_kl", "logits", _divergence(KF.soft_target_kl), LOGITS, ("T", "target", "topk")),
    Api("reverse_kl", "logits", _divergence(KF.reverse_kl), LOGITS, ("T", "target", "topk")),
    Api("jsd", "logits", _divergence(KF.jsd), LOGITS, ("T", "beta", "target", "topk")),
    Api("tvd", "logits", _divergence(KF.tvd), LOGITS, ("T", "target", "topk")),
    Api("decoupled_kd", "logits", lambda s, t, target=None, **kw: KF.decoupled_kd(
        s, t, _labels(len(s)) if target is None else target, **kw), LOGITS, ("T", "target", "weight:alpha")),
    Api("attention_transfer", "maps", KF.attention_transfer, ("f_s", "f_t"), ("p",)),
    Api("rkd", "embeddings", KF.rkd, ("e_s", "e_t"), ("weight:dist_weight",)),
    Api("rkd_distance", "embeddings", KF.rkd_distance, ("e_s", "e_t")),
    Api("rkd_angle", "embeddings", KF.rkd_angle, ("e_s", "e_t")),
    Api("pkt", "embeddings", KF.pkt, ("e_s", "e_t"), ("weight:eps",)),
    Api("similarity_preserving", "embeddings", KF.similarity_preserving, ("f_s", "f_t"), ("p",)),
    Api("SoftTarget", "logits", _loss(L.SoftTarget), ("student_logits", "teacher_logits"), ("T",)),
    Api("Logits", "logits", _loss(L.Logits), ("pred", "teacher_pred")),
    Api("Mutual", "logits", _loss(L.Mutual), LOGITS),
    Api("DecoupledKD", "logits", lambda s, t, target=None, **kw: _loss(L.DecoupledKD)(
        s, t, _labels(len(s)) if target is None else target, **kw), LOGITS, ("T", "target", "weight:alpha")),
    # (the token losses take a float target for soft labels, e.g. mixup's: no rows left out)
    Api("ReverseKL", "logits", _loss(L.ReverseKL), LOGITS, ("T", "target_range", "topk")),
    Api("JSD", "logits", _loss(L.JSD), LOGITS, ("T", "beta", "target_range", "topk")),
    Api("TVD", "logits", _loss(L.TVD), LOGITS, ("T", "target_range", "topk")),
    Api("Attention", "maps", _loss(L.Attention, layered=True), ("fm_s['a']", "fm_t['a']"), ("p",)),
    Api("ActivationBoundaries", "maps", _loss(L.ActivationBoundaries, layered=True), ("fm_s", "fm_t"),
        ("weight:m",)),
    Api("FitNet", "maps", _loss(L.FitNet, layered=True), ("fm_s", "fm_t")),
    Api("Similarity", "maps", _loss(L.Similarity, layered=True), ("f_s", "f_t"), ("p",), same_shape=False),
    Api("RKD", "embeddings", _loss(L.RKD), ("e_s", "e_t"), ("weight:dist_weight",)),
    Api("PKT", "embeddings", _loss(L.PKT), ("e_s", "e_t"), ("weight:eps",)),
]

SHAPES = {"logits": (4, 10), "maps": (2, 3, 4, 4), "embeddings": (4, 8)}


def _other_shape(kind):
    return {"logits": (4, 12), "maps": (2, 3, 8, 8), "embeddings": None}[kind]  # relational widths may differ


@dataclass
class Cell:
    api: str
    bad: str                    # a key of BAD
    call: Callable[[], object]
    error: type
    seen: tuple[str, ...]       # what the message must hold: the argument, the values seen


# bad input -> what it is (the docs' words)
BAD = {
    "integer": "integer student (`torch.int64`)",
    "complex": "complex teacher (`torch.complex64`)",
    "shape": "shapes that differ (where they must match)",
    "batch": "batch sizes that differ",
    "device": "teacher on another device (`meta`)",
    "empty": "empty tensors",
    "teacher_grad": "a teacher that requires grad with a student that does not (swapped arguments)",
    "T_nan": "T = nan",
    "T_zero": "T = 0",
    "T_negative": "T = -1",
    "beta": "beta = 1.5 (outside [0, 1])",
    "weight": "a weight, margin or eps of nan",
    "weight_negative": "a weight, margin or eps of -1",
    "p": "p = 0 (an exponent or norm)",
    "target_range": "target class 10 of 10 classes (not ignore_index)",
    "target_float": "float target",
    "topk_range": "TopK teacher with class index 10 of 10",
    "topk_float": "TopK teacher with float indices",
    "topk_k": "k larger than the classes of a row (a TopK teacher, topk_logits)",
    "batch_of_one": "a batch of 1 (relational losses compare samples)",
}


def _cells_for(api: Api) -> list[Cell]:
    shape = SHAPES[api.kind]
    s, t = _t(*shape), _t(*shape, seed=1)
    sn, tn = api.names
    call = api.call
    cells = [
        Cell(api.name, "integer", lambda: call(s.long(), t), TypeError, (sn, "torch.int64")),
        Cell(api.name, "complex", lambda: call(s, t.to(torch.complex64)), TypeError, (tn, "torch.complex64")),
        Cell(api.name, "batch", lambda: call(s, t[:1] if api.kind == "maps" else t[:3]), ValueError,
             (sn, tn, str(shape[0]))),
        Cell(api.name, "device", lambda: call(s, t.to("meta")), ValueError, (sn, tn, "meta", "cpu")),
        Cell(api.name, "empty", lambda: call(s[:0], t[:0]), ValueError, (sn, "empty", "[0, ")),
        Cell(api.name, "teacher_grad", lambda: call(s, t.clone().requires_grad_()), ValueError,
             (tn, "requires grad", sn)),
    ]
    other = _other_shape(api.kind)
    if other is not None and api.same_shape:
        cells.append(Cell(api.name, "shape", lambda: call(s, _t(*other)), ValueError,
                          (sn, tn, str(list(shape)[-1]), str(other[-1]))))
    if api.kind == "embeddings":
        cells.append(Cell(api.name, "batch_of_one", lambda: call(s[:1], t[:1]), ValueError, ("batch of 1",)))
    for param in api.params:
        if param == "T":
            cells += [Cell(api.name, "T_nan", lambda: call(s, t, T=NAN), ValueError, ("T", "nan")),
                      Cell(api.name, "T_zero", lambda: call(s, t, T=0), ValueError, ("T", "got 0")),
                      Cell(api.name, "T_negative", lambda: call(s, t, T=-1), ValueError, ("T", "got -1"))]
        elif param == "beta":
            cells.append(Cell(api.name, "beta", lambda: call(s, t, beta=1.5), ValueError, ("beta", "1.5")))
        elif param == "p":
            cells.append(Cell(api.name, "p", lambda: call(s, t, p=0), ValueError, ("p must", "got 0")))
        elif param.startswith("weight:"):
            name = param.split(":")[1]
            cells += [Cell(api.name, "weight", lambda name=name: call(s, t, **{name: NAN}), ValueError,
                           (name, "nan")),
                      Cell(api.name, "weight_negative", lambda name=name: call(s, t, **{name: -1}), ValueError,
                           (name, "got -1"))]
        elif param.startswith("target"):
            bad = _labels()
            bad[2] = 10
            cells.append(Cell(api.name, "target_range", lambda: call(s, t, target=bad), ValueError,
                              ("target", "class index 10", "[0, 10)", "ignore_index")))
            if param == "target":
                cells.append(Cell(api.name, "target_float", lambda: call(s, t, target=_labels().float()), TypeError,
                                  ("target", "torch.float32")))
        elif param == "topk":
            top = kdfast.topk_logits(t, 3)
            out = top.indices.clone()
            out[1, 0] = 10
            cells += [
                Cell(api.name, "topk_range", lambda: call(s, kdfast.TopK(out, top.logprobs)), ValueError,
                     ("teacher_logits.indices", "class index 10", "[0, 10)")),
                Cell(api.name, "topk_float", lambda: call(s, kdfast.TopK(top.indices.float(), top.logprobs)),
                     TypeError, ("teacher_logits.indices", "torch.float32")),
                Cell(api.name, "topk_k", lambda: call(s[:, :2], top), ValueError, ("k=3", "2 classes"))]
    return cells


def _topk_logits_cells() -> list[Cell]:
    t = _t(4, 10)
    return [
        Cell("topk_logits", "integer", lambda: kdfast.topk_logits(t.long(), 3), TypeError,
             ("teacher_logits", "torch.int64")),
        Cell("topk_logits", "complex", lambda: kdfast.topk_logits(t.to(torch.complex64), 3), TypeError,
             ("teacher_logits", "torch.complex64")),
        Cell("topk_logits", "empty", lambda: kdfast.topk_logits(t[:0], 3), ValueError, ("teacher_logits", "empty")),
        Cell("topk_logits", "topk_k", lambda: kdfast.topk_logits(t, 11), ValueError, ("k=11", "10 classes")),
    ]


def _fused_linear_cells() -> list[Cell]:
    """fused_linear_kd: the student's hidden states [4, 8] and LM head [10, 8], the teacher's
    (hidden [4, 6], head [10, 6])."""
    h, w, th, tw = _t(4, 8), _t(10, 8, seed=1), _t(4, 6, seed=2), _t(10, 6, seed=3)
    y = _labels()
    name = "fused_linear_kd"

    def call(**kw):
        args = {"student_hidden": h, "student_weight": w, "teacher": (th, tw), **kw}
        return lambda: KF.fused_linear_kd(**args)
    return [
        Cell(name, "integer", call(student_hidden=h.long()), TypeError, ("student_hidden", "torch.int64")),
        Cell(name, "shape", call(student_weight=w.t()), ValueError, ("student_weight", "[8, 10]", "width 8")),
        Cell(name, "batch", call(teacher=(th[:3], tw)), ValueError, ("teacher[0]", "3 rows", "the student 4")),
        Cell(name, "vocabulary", call(teacher=(th, tw[:9])), ValueError, ("teacher[1]", "9 classes", "10")),
        Cell(name, "T_nan", call(T=NAN), ValueError, ("T", "nan")),
        Cell(name, "beta", call(divergence="jsd", beta=1.5), ValueError, ("beta", "1.5")),
        Cell(name, "weight", call(soft_weight=NAN), ValueError, ("soft_weight", "nan")),
        Cell(name, "weight_negative", call(hard_weight=-1, target=y), ValueError, ("hard_weight", "-1")),
        Cell(name, "target_range", call(target=torch.tensor([1, 2, 3, 10]), hard_weight=1), ValueError,
             ("target", "class index 10", "[0, 10)")),
        Cell(name, "divergence", call(divergence="kl"), ValueError, ("divergence", "'kl'", "'jsd'")),
        Cell(name, "teacher_form", call(teacher="teacher"), TypeError, ("teacher", "str")),
        Cell(name, "hard_without_target", call(hard_weight=1.0), ValueError, ("hard_weight=1", "target")),
    ]


BAD.update({"vocabulary": "LM heads with different vocabularies",
            "divergence": "an unknown divergence name",
            "hard_without_target": "a cross-entropy weight without labels",
            "teacher_form": "a teacher that is neither (hidden, weight[, bias]), logits nor a TopK"})


class _Net(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _callback_cells() -> list[Cell]:
    from kdfast.fastai import KnowledgeDistillationCallback as KD
    name = "KnowledgeDistillationCallback"
    return [
        Cell(name, "layer_name", lambda: KD(_Net(), L.FitNet, ["1"], ["2.weight"]), ValueError,
             ("activations_teacher[0]", "'2.weight'")),
        Cell(name, "layer_name", lambda: KD(_Net(), L.FitNet, ["1"], ["relu"]), ValueError,
             ("activations_teacher[0]", "'relu'", "its layers start")),
        Cell(name, "layer_count", lambda: KD(_Net(), L.FitNet, ["0", "1"], ["1"]), ValueError,
             ("2 student layer", "1 teacher layer")),
        Cell(name, "weight", lambda: KD(_Net(), L.SoftTarget, weight=NAN), ValueError, ("weight", "nan")),
        Cell(name, "teacher_type", lambda: KD("resnet18", L.SoftTarget), TypeError, ("teacher", "str")),
    ]


BAD.update({"layer_name": "a layer name that is not a layer of the model",
            "layer_count": "student and teacher layer lists of different lengths",
            "teacher_type": "a teacher that is not an nn.Module"})


def cells() -> list[Cell]:
    out = [c for api in APIS for c in _cells_for(api)] + _topk_logits_cells() + _fused_linear_cells()
    try:
        out += _callback_cells()
    except ImportError:  # no fastai
        pass
    return out


# What kdfast accepts on purpose (the table's last section; tests/test_bad_inputs.py checks each).
ACCEPTED = [
    ("float16, bfloat16, float32 or float64 mixed between student and teacher",
     "computed in the wider accumulation dtype (float32, or float64 if either is)"),
    ("a teacher that requires grad, with a student that does too",
     "the teacher gets no gradient: its side is a target (fastai's callback runs it under no_grad)"),
    ("relational losses with student and teacher widths that differ", "compared through [B, B] Gram matrices"),
    ("attention maps of different spatial sizes with pool=True", "the larger map is average-pooled"),
]


def run(cell: Cell) -> BaseException | None:
    try:
        cell.call()
    except (TypeError, ValueError, RuntimeError) as e:
        return e
    return None


def render() -> str:
    """docs/errors.md: per bad input, the functions and losses it applies to, the error and
    one message."""
    by_bad: dict[str, list[Cell]] = {}
    for c in cells():
        by_bad.setdefault(c.bad, []).append(c)
    lines = ["# Errors for bad input", "",
             "Generated by `python tests/bad_inputs.py` from the matrix that tests/test_bad_inputs.py runs:",
             "every public function and loss of kdfast x each bad input raises a ValueError or TypeError",
             "whose message names the argument, the values seen and the fix.", "",
             "| bad input | error | raised by | example message |", "|---|---|---|---|"]
    for bad, group in by_bad.items():
        first = run(group[0])
        message = str(first).split("\n")[0].replace("|", "\\|")
        apis = ", ".join(dict.fromkeys(f"`{c.api}`" for c in group))
        lines.append(f"| {BAD[bad]} | {group[0].error.__name__} | {apis} | {message} |")
    lines += ["", "Accepted on purpose:", ""] + [f"- {what}: {how}." for what, how in ACCEPTED]
    return "\n".join(lines) + "\n"


DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "errors.md")

if __name__ == "__main__":
    with open(DOCS, "w") as f:
        f.write(render())
    print(f"wrote {os.path.relpath(DOCS)}")

