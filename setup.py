"""Build kdfast and its compiled extension ``kdfast._C``.

The C++ CPU kernels are always built. The CUDA kernels are built whenever the
installed torch is a CUDA build and nvcc is found (no GPU is needed to compile);
set ``KDFAST_NO_CUDA=1`` to skip them. ``TORCH_CUDA_ARCH_LIST`` picks the GPU
architectures (default ``8.0;9.0+PTX``), ``MAX_JOBS`` the parallel compile jobs.

Install with ``pip install -e . --no-build-isolation``: the extension must be
compiled against the torch that will import it, and build isolation would
download a separate (several GB) torch into a throw-away environment.
"""
import glob
import os
import platform
import shutil


def locate_cuda_toolkit():
    """Point CUDA_HOME at a toolkit with headers and libraries, unless the user did.

    torch takes the folder above the first `nvcc` on PATH, which is wrong when that nvcc
    is a wrapper script outside the toolkit.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for home in candidates + ["/usr/local/cuda"]:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")) and \
                os.path.isfile(os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return


locate_cuda_toolkit()

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def cuda_build_reason():
    """None when CUDA kernels should be built, else why they are not."""
    if os.environ.get("KDFAST_NO_CUDA", "0") not in ("", "0"):
        return "KDFAST_NO_CUDA is set"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None:
        return "nvcc not found (set CUDA_HOME)"
    return None


def default_max_jobs():
    # nvcc needs ~1.5 GB per job on kdfast's sources; stay within cores and memory.
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    return str(max(1, min(os.cpu_count() or 1, int(mem_gb // 1.5))))


def write_source_hashes():
    """build/generated/kdfast_source_hashes.h: the hashes of the CUDA kernels' sources, per
    family (kdfast/_validation.py), for kdfast._C's build info: a validation record counts
    only for kernels built from the sources it was made with. Rewritten only when they
    change, so that an unchanged build stays up to date."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_kdfast_validation", os.path.join(HERE, "kdfast", "_validation.py"))
    validation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(validation)
    folder = os.path.join(HERE, "build", "generated")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "kdfast_source_hashes.h")
    text = f'#define KDFAST_CUDA_SOURCE_HASHES "{validation.build_hashes()}"\n'
    if not os.path.isfile(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)
    return folder


def extension():
    reason = cuda_build_reason()
    with_cuda = reason is None
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"]
    if platform.machine() in ("x86_64", "AMD64"):
        # ATen's Vectorized<float> on AVX2 + FMA (8 lanes, SLEEF exp from libtorch).
        # kdfast._C refuses to load on a CPU without AVX2 (see kdfast/_extension.py).
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if not with_cuda:
        print(f"kdfast: building without CUDA kernels ({reason})")
    build_info = [f"-DKDFAST_WITH_CUDA={int(with_cuda)}"]
    kwargs = dict(
        name="kdfast._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if not with_cuda:
        return CppExtension(extra_compile_args={"cxx": cxx + build_info}, **kwargs)
    kwargs["sources"] += sorted(glob.glob("csrc/cuda/*.cu"))
    kwargs["include_dirs"].append(write_source_hashes())
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    return CUDAExtension(extra_compile_args={"cxx": cxx + build_info, "nvcc": nvcc + build_info}, **kwargs)


os.environ.setdefault("MAX_JOBS", default_max_jobs())
setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
