"""learn.export() after distillation: the file leaves the teacher out, load_learner loads it,
and the loaded learner predicts as the trained one."""
import warnings

import pytest
import torch

pytest.importorskip("fastai")
from fastai.data.core import Datasets  # noqa: E402
from fastai.data.transforms import ItemGetter  # noqa: E402
from fastai.learner import load_learner  # noqa: E402

import kdfast.losses as L  # noqa: E402
from kdfast.fastai import KnowledgeDistillationCallback  # noqa: E402
from test_fastai import STUDENT_LAYERS, TEACHER_LAYERS, fit_quietly, learner, make_items, teacher_net  # noqa: E402


def _size(model):
    return sum(p.numel() * p.element_size() for p in model.state_dict().values())


@pytest.mark.parametrize("blend_valid", [False, True])
def test_export_leaves_the_teacher_out_and_the_loaded_learner_predicts(tmp_path, blend_valid):
    teacher = teacher_net()
    teacher.register_buffer("ballast", torch.zeros(1 << 16))  # 256 KB: the file would show it
    kd = KnowledgeDistillationCallback(teacher, L.Attention, STUDENT_LAYERS, TEACHER_LAYERS, blend_valid=blend_valid)
    tfms = [[ItemGetter(0)], [ItemGetter(1)]]
    dls = Datasets(make_items(32, 0), tfms, splits=[list(range(24)), list(range(24, 32))]).dataloaders(bs=8)
    learn = learner(dls=dls, cbs=kd, path=tmp_path)  # held by the Learner: export pickles it
    fit_quietly(learn, 1, 1e-2)
    learn.export("student.pkl")
    exported = tmp_path / "student.pkl"
    assert exported.stat().st_size < _size(learn.model) + _size(teacher) // 2, "the file holds the teacher"
    assert kd.teacher is teacher, "export changed the live callback"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_learner(exported)
    cb = next(c for c in loaded.cbs if isinstance(c, KnowledgeDistillationCallback))
    assert cb.teacher is None
    items = make_items(6, seed=7)
    preds, _ = loaded.get_preds(dl=loaded.dls.test_dl(items))
    x = torch.stack([x for x, _ in items])
    learn.model.eval()
    with torch.no_grad():
        expected = torch.softmax(learn.model(x), 1)
    torch.testing.assert_close(preds, expected)
    with pytest.raises(RuntimeError, match=r"no teacher: it was loaded from learn.export\(\)"):
        fit_quietly(loaded, 1, 1e-2)
    cb.teacher = teacher  # given a teacher again, it distils
    fit_quietly(loaded, 1, 1e-2)
