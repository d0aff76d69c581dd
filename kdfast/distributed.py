"""The import path of kdfast.fastai.distributed (``distrib_ctx``, ``MixedPrecision``); needs fastai."""
from .fastai.distributed import *  # noqa: F401,F403
from .fastai.distributed import __all__  # noqa: F401
