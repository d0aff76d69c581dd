"""Everything a fastai distillation script uses, in one import — the drop-in for
``from fasterai.distill.all import *`` (plus the fastai vision names it is used with):

    from kdfast.all import *

fastai.vision.all's names, then kdfast's losses, schedules, ``KnowledgeDistillationCallback``,
``match_feature_layers``, ``get_model_layers`` and ``get_module_by_name`` (kdfast's names win
where they coincide, as ``cos`` the schedule).
"""
from fastai.vision.all import *  # noqa: F401,F403

from .fastai import *  # noqa: F401,F403
from .losses import *  # noqa: F401,F403
from .schedule import *  # noqa: F401,F403
