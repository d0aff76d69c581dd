"""kdfast for fastai: fasterai's ``KnowledgeDistillationCallback`` (:mod:`kdfast.fastai.callback`)
and distributed / mixed-precision training (:mod:`kdfast.fastai.distributed`), over the
torch-only layer tools of :mod:`kdfast.layers` (re-exported here, as fasterai has them).

    from kdfast.all import *          # fastai.vision's names and all of kdfast's
    kd = KnowledgeDistillationCallback(teacher.model, SoftTarget, schedule=cos)
    student.fit_one_cycle(10, 1e-3, cbs=kd)

Needs fastai (``pip install fastai`` or ``kdfast[fastai]``); ``kdfast.layers`` does not.
"""
try:
    import fastai  # noqa: F401
except ImportError as e:  # pragma: no cover - fastai is optional for kdfast
    raise ImportError("kdfast.fastai needs fastai: pip install fastai accelerate (or kdfast[fastai]); "
                      "match_feature_layers, get_model_layers and get_module_by_name need only torch: "
                      "import them from kdfast.layers") from e

from ..layers import get_model_layers, get_module_by_name, match_feature_layers
from .callback import KnowledgeDistillationCallback

__all__ = ["KnowledgeDistillationCallback", "get_model_layers", "get_module_by_name", "match_feature_layers"]
