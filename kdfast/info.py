"""``kdfast.info()`` / ``kdfast info``: versions, how kdfast._C was built, and for every
backend whether it is available and, if not, why."""
from __future__ import annotations

import platform

import torch

from . import _backend, _extension, _validation, _verify
from .ops import attention, relational, softmax_kl

OPS = {
    "soft_target_kl / reverse_kl / jsd / tvd (dense or top-k teachers) / decoupled_kd": softmax_kl.KERNELS,
    "attention_transfer": attention.KERNELS,
    "rkd / rkd_distance / rkd_angle / pkt / similarity_preserving": relational.KERNELS,
}


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "not installed"


def info_text() -> str:
    from . import __version__

    lines = [
        f"kdfast {__version__}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), triton {_triton_version()}, "
        f"Python {platform.python_version()}",
    ]
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name()} (compute capability "
                     f"{'.'.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        lines.append("GPU: none")
    if _extension.LOADED:
        b = _extension.BUILD_INFO
        cuda = (f"with CUDA {b.get('cuda_runtime', '?')} kernels for archs {b.get('cuda_archs', '?')}"
                if _extension.WITH_CUDA else "without CUDA kernels")
        lines.append(f"kdfast._C: built for torch {b.get('torch')} with {b.get('compiler', '?')}, "
                     f"CPU {b.get('cpu_capability', '?')}, {cuda}")
    else:
        lines.append(f"kdfast._C: not loaded: {_extension.LOAD_ERROR}")
    lines.append(f"backend in force: {_backend.current_backend()} (KDFAST_BACKEND / kdfast.use_backend)")
    lines.append("backends:")
    for name in _backend.BACKENDS:
        reason = _backend.PLATFORM_REASONS[name]
        devices = ", ".join(_backend.BACKEND_DEVICES.get(name, ("any device",)))
        if name == "triton" and _backend.TRITON_INTERPRETED:
            devices += " (interpreted on the CPU: TRITON_INTERPRET=1)"
        status = f"available ({devices})" if reason is None else f"unavailable: {reason}"
        lines.append(f"  {name:7s} {status}")
    lines.append("ops (kernels; auto picks per device: cuda > triton > torch on GPU, cpu > torch on CPU):")
    for op, kernels in OPS.items():
        lines.append(f"  {op}: {', '.join(kernels)}")
    lines += validation_lines()
    return "\n".join(lines)


def validation_lines() -> list[str]:
    """Per GPU backend and kernel family: the record that validates its kernels (for this
    GPU's compute capability when there is a GPU), or that they are checked on first use."""
    capability = _verify.capability(torch.device("cuda")) if torch.cuda.is_available() else None
    try:
        setting = _verify.mode()
    except ValueError as e:
        setting = str(e)
    where = f"this GPU's compute capability {capability}" if capability else "any GPU (none here)"
    lines = [f"GPU kernels (KDFAST_VERIFY={setting}; records of `make gpu-check` for {where}):"]
    records = _validation.load()
    for backend in _validation.GPU_BACKENDS:
        for family in _validation.FAMILIES:
            if _validation.current_hash(family, backend) is None:
                status = "not built" if backend == "cuda" else "sources not found"
            else:
                record = _validation.matching(family, backend, capability, records)
                status = (f"validated on {record.get('gpu')} ({record.get('capability')}) at {record.get('commit')}"
                          if record else "unvalidated: checked on first use")
            lines.append(f"  {backend:7s} {family:12s} {status}")
    return lines


def info() -> None:
    """Print kdfast's versions, build and backend status."""
    print(info_text())
