"""The validation record: which GPU kernels passed every test of their family on which GPU.

``make gpu-check`` (tests/gpu_check.py) runs each kernel family's tests per GPU backend on
a GPU; when all of a family's tests pass it adds a record (family, backend, GPU name,
compute capability, a hash of the family's kernel sources, kdfast commit, date, tests run)
to ``kdfast/validation.json``, which is committed. A record counts for a GPU of the same
compute capability running kernels built from the same sources: editing a kernel source
invalidates its family's records by itself. Kernels without a valid record are checked
on first use (kdfast/_verify.py).

The CUDA kernels' source hashes are computed when kdfast._C is built (setup.py loads this
file on its own: it imports only the standard library) and compiled into its build info,
so they describe the kernels that are loaded; the Triton kernels' hashes are computed from
the package's files.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib

FAMILIES = ("softmax_kl", "attention", "relational")
GPU_BACKENDS = ("cuda", "triton")
ROOT = pathlib.Path(__file__).resolve().parent.parent  # the checkout (csrc/ next to kdfast/)
RECORD = pathlib.Path(__file__).resolve().parent / "validation.json"

# The kernel sources of each family per GPU backend (glob patterns relative to ROOT), and
# the sources every family of a backend shares.
SOURCES = {
    "cuda": {family: [f"csrc/{family}*.h", f"csrc/cuda/{family}.cu"] for family in FAMILIES},
    "triton": {family: [f"kdfast/triton/{family}.py"] for family in FAMILIES},
}
SHARED_SOURCES = {
    "cuda": ["csrc/common.h", "csrc/host_device.h", "csrc/cuda/scale_grad.cu"],
    "triton": ["kdfast/triton/__init__.py", "kdfast/triton/_args.py"],
}


def source_files(family: str, backend: str, root: pathlib.Path = ROOT) -> list[pathlib.Path]:
    files = set()
    for pattern in SOURCES[backend][family] + SHARED_SOURCES[backend]:
        files.update(root.glob(pattern))
    return sorted(files)


def hash_sources(family: str, backend: str, root: pathlib.Path = ROOT) -> str | None:
    """A hash of the family's kernel sources for a backend (names and contents), or None
    when they are not there (an installed kdfast has no csrc/)."""
    files = source_files(family, backend, root)
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_hashes(root: pathlib.Path = ROOT) -> str:
    """``family:hash,...`` of the CUDA sources, compiled into kdfast._C by setup.py."""
    return ",".join(f"{family}:{hash_sources(family, 'cuda', root) or 'none'}" for family in FAMILIES)


def current_hash(family: str, backend: str) -> str | None:
    """The source hash of the kernels this process runs."""
    if backend == "triton":
        return hash_sources(family, "triton")
    from . import _extension  # the hashes kdfast._C was built from

    built = (_extension.BUILD_INFO or {}).get("cuda_sources", "")
    return dict(item.split(":", 1) for item in built.split(",") if ":" in item).get(family)


def load(path: pathlib.Path | str | None = None) -> list[dict]:
    path = pathlib.Path(path or os.environ.get("KDFAST_VALIDATION_RECORD") or RECORD)
    try:
        return json.loads(path.read_text())["records"]
    except (OSError, ValueError, KeyError):
        return []


def matching(family: str, backend: str, capability: str | None, records: list[dict] | None = None) -> dict | None:
    """The record that validates this family's kernels on a GPU of this compute capability
    (any capability when None), for the sources this process runs; None if there is none."""
    source = current_hash(family, backend)
    if source is None:
        return None
    for record in load() if records is None else records:
        if (record.get("family"), record.get("backend"), record.get("sources")) == (family, backend, source) \
                and (capability is None or record.get("capability") == capability):
            return record
    return None


def merge(records: list[dict], new: dict) -> list[dict]:
    """records with ``new`` in place of any record of the same family, backend and compute
    capability (a GPU's newest validation replaces its previous one)."""
    same = (new["family"], new["backend"], new["capability"])
    kept = [r for r in records if (r.get("family"), r.get("backend"), r.get("capability")) != same]
    return sorted(kept + [new], key=lambda r: (r["family"], r["backend"], r["capability"]))


def write(records: list[dict], path: pathlib.Path | str) -> None:
    pathlib.Path(path).write_text(json.dumps({"records": records}, indent=1) + "\n")
