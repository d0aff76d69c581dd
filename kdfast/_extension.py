"""Loading ``kdfast._C``, the compiled kernels, and what it was built with.

If the extension is missing or fails to load, ``import kdfast`` still works: every op
falls back to its pure-PyTorch reference, and ``kdfast.info()`` says why.
"""
from __future__ import annotations

import platform

import torch

_REBUILD = "rebuild it with `pip install -e . --no-build-isolation` in the kdfast checkout"


def _cpu_lacks_avx2() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return " avx2" not in f.read()
    except OSError:
        return False


def _load() -> tuple[dict[str, str] | None, str | None]:
    """(build info, None) when kdfast._C loaded, else (None, why not)."""
    try:
        import importlib.util

        if importlib.util.find_spec("kdfast._C") is None:
            return None, f"kdfast._C is not built; {_REBUILD}"
    except (ImportError, ValueError) as e:
        return None, f"kdfast._C cannot be found ({e}); {_REBUILD}"
    if _cpu_lacks_avx2():
        return None, "kdfast._C is built for AVX2 CPUs and this CPU lacks AVX2"
    try:
        from . import _C  # noqa: F401  (registers the torch.ops.kdfast_C operators)
    except (ImportError, OSError) as e:
        return None, (f"kdfast._C failed to load, probably built for another torch than {torch.__version__} ({e}); "
                      f"{_REBUILD}")
    info = dict(line.split("=", 1) for line in torch.ops.kdfast_C.build_info().splitlines() if "=" in line)
    if info.get("torch", torch.__version__).split("+")[0] != torch.__version__.split("+")[0]:
        return None, f"kdfast._C was built for torch {info['torch']}, this is torch {torch.__version__}; {_REBUILD}"
    return info, None


BUILD_INFO, LOAD_ERROR = _load()
LOADED = BUILD_INFO is not None
WITH_CUDA = LOADED and BUILD_INFO.get("cuda") == "1"
