"""Everything a fastai distillation script uses, in one import — the drop-in for
``from fasterai.distill.all import *`` (plus the fastai vision names it is used with):

    from kdfast.all import *

fastai.vision.all's names, then kdfast's losses, schedules, ``KnowledgeDistillationCallback``,
``match_feature_layers``, ``get_model_layers``, ``get_module_by_name``, ``distrib_ctx`` and
``MixedPrecision`` (kdfast's names win where they coincide: ``cos`` is the schedule,
``MixedPrecision`` fastai's callback that also autocasts on CPUs).
"""
from . import fastai as _fastai_layer  # noqa: F401  (first: without fastai it says what to install)
from fastai.vision.all import *  # noqa: F401,F403,E402,I001

from .fastai import *  # noqa: F401,F403
from .fastai.distributed import *  # noqa: F401,F403  (distrib_ctx; MixedPrecision on any device)
from .losses import *  # noqa: F401,F403
from .schedule import *  # noqa: F401,F403
