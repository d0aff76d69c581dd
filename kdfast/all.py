"""Everything a fastai distillation script uses, in one import — the drop-in for
``from fasterai.distill.all import *`` (plus the fastai vision names it is used with):

    from kdfast.all import *

fastai.vision.all's names, then kdfast's losses, schedules, ``KnowledgeDistillationCallback``,
``match_feature_layers``, ``get_model_layers``, ``get_module_by_name``, ``distrib_ctx`` and
``MixedPrecision`` (kdfast's names win where they coincide: ``cos`` is the schedule,
``MixedPrecision`` fastai's callback that also autocasts on CPUs).
"""
from fastai.vision.all import *  # noqa: F401,F403

from .distributed import *  # noqa: F401,F403  (distrib_ctx; MixedPrecision on any device)
from .fastai import *  # noqa: F401,F403
from .losses import *  # noqa: F401,F403
from .schedule import *  # noqa: F401,F403
