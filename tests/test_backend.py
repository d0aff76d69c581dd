"""Choosing and forcing backends; the extension's build; `kdfast info`."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import kdfast
from kdfast import _backend, _extension
from kdfast import functional as KF


def run_python(code: str, cwd=None, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("KDFAST_BACKEND", "TRITON_INTERPRET")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**environ, **env}, timeout=300, cwd=cwd)


def test_use_backend_as_context_manager_restores():
    assert kdfast.current_backend() == "auto"
    with kdfast.use_backend("torch"):
        assert kdfast.current_backend() == "torch"
        with kdfast.use_backend("auto"):
            assert kdfast.current_backend() == "auto"
        assert kdfast.current_backend() == "torch"
    assert kdfast.current_backend() == "auto"


def test_use_backend_without_with_stays_in_force():
    kdfast.use_backend("torch")
    assert kdfast.current_backend() == "torch"  # the autouse fixture restores auto afterwards


def test_forced_backends_give_the_same_numbers():
    s, t = torch.randn(6, 40), torch.randn(6, 40)
    with kdfast.use_backend("torch"):
        ref = KF.soft_target_kl(s, t, T=3)
    for name in ("auto",) + tuple(b for b in kdfast.BACKENDS
                                  if _backend.unavailable_reason(b, "cpu", ("torch", "cpu", "triton")) is None):
        with kdfast.use_backend(name):
            assert torch.allclose(KF.soft_target_kl(s, t, T=3), ref, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_forcing_an_unavailable_backend_says_why():
    expected = (r"backend 'cuda' \(forced by use_backend\(\)\) cannot run soft_target_kl on cpu tensors: "
                r".*(no CUDA GPU|without CUDA)")
    with kdfast.use_backend("cuda"), pytest.raises(kdfast.BackendUnavailable, match=expected):
        KF.soft_target_kl(torch.randn(2, 3), torch.randn(2, 3))


def test_an_op_without_the_kernel_says_so():
    reason = _backend.unavailable_reason("cpu", "cpu", ("torch",))
    assert reason == "this op has no cpu kernel (it has: torch)"


def test_env_var_forces_a_backend():
    code = ("import torch, kdfast; from kdfast import functional as KF; print(kdfast.current_backend()); "
            "print(KF.soft_target_kl(torch.randn(2, 3), torch.randn(2, 3)).item() >= 0)")
    out = run_python(code, KDFAST_BACKEND="torch")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch", "True"]


def test_bad_env_var_fails_at_first_use_not_import():
    out = run_python("import kdfast; print('imported'); kdfast.current_backend()", KDFAST_BACKEND="fast")
    assert "imported" in out.stdout
    assert "unknown backend 'fast' from the KDFAST_BACKEND environment variable" in out.stderr


def test_triton_on_cpu_needs_the_interpreter():
    code = ("import torch, kdfast; from kdfast import functional as KF; kdfast.use_backend('triton'); "
            "KF.soft_target_kl(torch.randn(2, 3), torch.randn(2, 3))")
    out = run_python(code, CUDA_VISIBLE_DEVICES="")
    assert out.returncode != 0 and "TRITON_INTERPRET=1" in out.stderr


def test_extension_loaded():
    assert _extension.LOADED, _extension.LOAD_ERROR
    assert _backend.select_backend("soft_target_kl", ("torch", "cpu"), torch.device("cpu")) == "cpu"


@pytest.mark.skipif(shutil.which("nvcc") is None or torch.version.cuda is None
                    or os.environ.get("KDFAST_NO_CUDA", "0") not in ("", "0"),
                    reason="CUDA kernels are compiled only where nvcc and a CUDA torch exist")
def test_cuda_kernels_were_compiled():
    assert _extension.WITH_CUDA, "nvcc is here but kdfast._C was built without CUDA kernels"
    assert "900" in _extension.BUILD_INFO.get("cuda_archs", ""), _extension.BUILD_INFO


def test_kdfast_info_explains_every_backend():
    out = subprocess.run([sys.executable, "-m", "kdfast.cli", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"kdfast {kdfast.__version__}" in text and f"torch {torch.__version__}" in text and "triton" in text
    assert "kdfast._C: built for torch" in text
    for name in kdfast.BACKENDS:
        line = next(line for line in text.splitlines() if line.startswith(f"  {name} "))
        assert "available (" in line or "unavailable: " in line, line


def test_without_the_extension_everything_falls_back(tmp_path):
    """A kdfast whose kdfast._C is missing imports, computes on the torch backend, and says why."""
    package = os.path.dirname(kdfast.__file__)
    shutil.copytree(package, tmp_path / "kdfast", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    # (an editable install's import hook would find the checkout's kdfast._C: drop it)
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            "import torch, kdfast; from kdfast import _backend; from kdfast import functional as KF; "
            "s, t = torch.randn(4, 9), torch.randn(4, 9); "
            "print(_backend.select_backend('soft_target_kl', ('torch', 'cpu'), s.device)); "
            "print(float(KF.soft_target_kl(s, t, T=2)) >= 0); kdfast.info()")
    out = run_python(code, cwd=tmp_path, PYTHONPATH=str(tmp_path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["torch", "True"]
    assert any("kdfast._C: not loaded: kdfast._C is not built" in line for line in lines), out.stdout
    assert any(line.startswith("  cpu     unavailable: kdfast._C is not built") for line in lines), out.stdout
