"""Every Triton kernel kdfast launches compiles for an sm_90 GPU, checked without a GPU.

The other Triton tests run the kernels in Triton's interpreter, which accepts code the
compiler rejects; this one compiles them (tests/triton_sm90_compile.py) with the launch
arguments the wrappers really pass, for every dtype, down to the GPU's machine code.
"""
import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

SCRIPT = pathlib.Path(__file__).with_name("triton_sm90_compile.py")
KERNELS_DIR = pathlib.Path(__file__).resolve().parent.parent / "kdfast" / "triton"


def _launched_kernels() -> set[str]:
    """The names of the jit functions launched as ``name[grid](...)`` in kdfast/triton."""
    names = set()
    for path in KERNELS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) \
                    and isinstance(node.func.value, ast.Name):
                names.add(node.func.value.id)
    return names


@pytest.mark.slow
def test_every_triton_kernel_compiles_for_sm90():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this triton cannot compile ahead of time: {e}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert not report["failures"], json.dumps(report["failures"], indent=1)[:6000]
    assert set(report["compiled"]) == _launched_kernels()
