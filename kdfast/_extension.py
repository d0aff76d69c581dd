"""Loading ``kdfast._C``, the compiled kernels, and what it was built with.

If the extension is missing or fails to load, ``import kdfast`` still works: every op
falls back to its pure-PyTorch reference, and ``kdfast.info()`` says why.

The CPU kernels are compiled once per instruction set (DEFAULT, and AVX2 and AVX512 on
x86-64); the extension loads on any CPU and runs the best build the CPU supports, as
ATen picks its own (``torch.backends.cpu.get_cpu_capability()``, lowered by
``ATEN_CPU_CAPABILITY``), or the one ``KDFAST_CPU_CAPABILITY`` names.
"""
from __future__ import annotations

import torch

_REBUILD = "rebuild it with `pip install -e . --no-build-isolation` in the kdfast checkout"


def _load() -> tuple[dict[str, str] | None, str | None]:
    """(build info, None) when kdfast._C loaded, else (None, why not)."""
    try:
        import importlib.util

        if importlib.util.find_spec("kdfast._C") is None:
            return None, f"kdfast._C is not built; {_REBUILD}"
    except (ImportError, ValueError) as e:
        return None, f"kdfast._C cannot be found ({e}); {_REBUILD}"
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


def cpu_capability() -> str | None:
    """The build of the CPU kernels in use ("DEFAULT", "AVX2", "AVX512"), None without kdfast._C."""
    return torch.ops.kdfast_C.cpu_capability() if LOADED else None


def set_cpu_capability(name: str) -> str:
    """Run another build of the CPU kernels (e.g. "default" for the portable one); returns the
    previous one. For tests and benchmarks; raises for a build this CPU cannot run."""
    if not LOADED:
        raise RuntimeError(f"kdfast: {LOAD_ERROR}")
    return torch.ops.kdfast_C.set_cpu_capability(name)
