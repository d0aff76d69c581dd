"""The CPU kernels' builds per instruction set (DEFAULT, AVX2, AVX512): the choice at run
time, the portable build, each build's kernels against the reference, and the exp they use."""
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import kdfast
from kdfast import _extension
from kdfast import functional as KF
from kdfast.info import info_text
from helpers import LOSS_TOLERANCE, TOLERANCE, assert_close

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason="kdfast._C is not built")

SUPPORTED = _extension.BUILD_INFO["cpu_capabilities_supported"].split(",") if _extension.LOADED else []


@pytest.fixture(params=SUPPORTED)
def capability(request):
    """Each kernel build this CPU runs, in turn (the one in use is restored afterwards)."""
    previous = _extension.set_cpu_capability(request.param)
    yield request.param
    _extension.set_cpu_capability(previous)


def test_build_info_reports_the_builds():
    built = _extension.BUILD_INFO["cpu_capabilities"].split(",")
    assert built[0] == "DEFAULT" and set(SUPPORTED) <= set(built)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):  # x86-64
        assert built == ["DEFAULT", "AVX2", "AVX512"]
    assert _extension.cpu_capability() in SUPPORTED
    assert f"CPU kernels: {_extension.cpu_capability()} in use" in info_text()


def test_the_default_follows_aten_and_never_exceeds_the_cpu():
    if os.environ.get("KDFAST_CPU_CAPABILITY"):
        pytest.skip("KDFAST_CPU_CAPABILITY chooses the build")
    # ATen's choice (a name kdfast has no build for counts as DEFAULT), capped at this CPU's best
    ranks = ["DEFAULT", "AVX2", "AVX512"]
    aten = torch.backends.cpu.get_cpu_capability()
    rank = ranks.index(aten) if aten in ranks else 0
    expected = [c for c in SUPPORTED if ranks.index(c) <= rank][-1]
    assert _extension.BUILD_INFO["cpu_capability"] == expected


def test_an_unknown_or_unsupported_build_is_refused():
    with pytest.raises(RuntimeError, match="not a kernel build this CPU runs"):
        _extension.set_cpu_capability("sse9")


def test_the_portable_build_is_chosen_by_the_environment():
    # A fresh process, as a CPU without AVX2 would run it: the DEFAULT build, and its kernels work.
    code = ("import torch, kdfast; from kdfast import _extension, functional as KF; "
            "s = torch.randn(5, 301, requires_grad=True); t = torch.randn(5, 301); "
            "KF.soft_target_kl(s, t, T=2.0).backward(); "
            "print(_extension.cpu_capability(), bool(torch.isfinite(s.grad).all()))")
    env = {**os.environ, "KDFAST_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["DEFAULT", "True"]


def _ulps_of_kernel_exp(x: torch.Tensor) -> float:
    y = torch.ops.kdfast_C.cpu_exp(x, "kernel", 1)
    # The kernels compute 2^u of a float32 u = x log2(e): compare with exactly that.
    u = (x * torch.tensor(1.4426950408889634, dtype=torch.float32)).double()
    exact = torch.exp2(u)
    normal = exact > torch.finfo(torch.float32).tiny
    return ((y.double() - exact).abs() / exact)[normal].max().item() / 2**-24


def test_kernel_exp_accuracy(capability):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([-87 * torch.rand(400000, generator=g), -torch.rand(100000, generator=g),
                   -torch.arange(0, 87, 0.25)])
    assert _ulps_of_kernel_exp(x) <= 3.0  # the polynomial's 8e-8 plus float32 rounding
    special = torch.tensor([0.0, -0.0, float("-inf"), float("nan"), -1e30, -200.0, -1e-30])
    y = torch.ops.kdfast_C.cpu_exp(special, "kernel", 1)
    assert y[0] == 1 and y[1] == 1 and y[2] == 0 and torch.isnan(y[3]) and y[4] == 0 and y[5] == 0
    assert abs(y[6] - 1) <= 2**-23
    z = torch.ops.kdfast_C.cpu_exp(x[:1000].contiguous(), "sleef", 3)
    assert_close(z, torch.exp(x[:1000].double()), 4e-7, "sleef exp")


SOFTMAX_CASES = [  # shape, dim, dtype: rows and columns layouts, odd sizes, every accumulation type
    ((7, 1031), -1, torch.float32),
    ((3, 4, 77), -1, torch.bfloat16),
    ((2, 19, 3, 5), 1, torch.float32),
    ((5, 333), -1, torch.float64),
]


@pytest.mark.parametrize("shape,dim,dtype", SOFTMAX_CASES, ids=str)
@pytest.mark.parametrize("decoupled", [False, True])
def test_softmax_kl_on_every_build(capability, shape, dim, dtype, decoupled):
    g = torch.Generator().manual_seed(1)
    s = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    t = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    if not decoupled:  # a class of probability 0 for both (DecoupledKD's reference gives it NaN)
        s.view(-1)[7] = float("-inf")
        t.view(-1)[7] = float("-inf")
    d = dim % len(shape)
    target = torch.randint(0, s.shape[d], (s.numel() // s.shape[d],), generator=g).view(shape[:d] + shape[d + 1:])
    target.view(-1)[1] = -100
    fn = KF.decoupled_kd if decoupled else KF.soft_target_kl
    results = []
    for backend, x in (("cpu", s), ("torch", s.double())):
        x = x.detach().requires_grad_()
        with kdfast.use_backend(backend):
            loss = fn(x, t if backend == "cpu" else t.double(), T=2.0, dim=dim, target=target, ignore_index=-100)
        (0.7 * loss).backward()
        results.append((loss.detach(), x.grad))
    (loss, grad), (ref_loss, ref_grad) = results
    assert_close(loss, ref_loss, LOSS_TOLERANCE[dtype], "loss")
    assert_close(grad, ref_grad, TOLERANCE[dtype], "grad")


@pytest.mark.parametrize("shape,dim,dtype", SOFTMAX_CASES[:3], ids=str)
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "tvd"])
def test_divergences_on_every_build(capability, shape, dim, dtype, divergence):
    g = torch.Generator().manual_seed(4)
    s = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    t = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    fn = getattr(KF, divergence)
    results = []
    for backend, x, y in (("cpu", s, t), ("torch", s.double(), t.double())):
        x = x.detach().requires_grad_()
        with kdfast.use_backend(backend):
            loss = fn(x, y, T=2.0, dim=dim)
        (0.7 * loss).backward()
        results.append((loss.detach(), x.grad))
    (loss, grad), (ref_loss, ref_grad) = results
    assert_close(loss, ref_loss, LOSS_TOLERANCE[dtype], "loss")
    assert_close(grad, ref_grad, TOLERANCE[dtype], "grad")


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_sparse_teachers_on_every_build(capability, tail):
    g = torch.Generator().manual_seed(5)
    s, t = 3 * torch.randn(6, 301, generator=g), 3 * torch.randn(6, 301, generator=g)
    topk = kdfast.topk_logits(t, 17)
    results = []
    for backend, x, logprobs in (("cpu", s, topk.logprobs), ("torch", s.double(), topk.logprobs.double())):
        x = x.detach().requires_grad_()
        with kdfast.use_backend(backend):
            loss = KF.jsd(x, kdfast.TopK(topk.indices, logprobs), tail=tail)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (loss, grad), (ref_loss, ref_grad) = results
    assert_close(loss, ref_loss, LOSS_TOLERANCE[torch.float32], "loss")
    assert_close(grad, ref_grad, TOLERANCE[torch.float32], "grad")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("p", [2.0, 3.0])
def test_attention_transfer_on_every_build(capability, channels_last, p):
    g = torch.Generator().manual_seed(2)
    fs = [torch.randn(3, 24, 7, 9, generator=g), torch.randn(3, 8, 4, 4, generator=g)]
    ft = [torch.randn(3, 40, 7, 9, generator=g), torch.randn(3, 5, 4, 4, generator=g)]
    if channels_last:
        fs = [f.contiguous(memory_format=torch.channels_last) for f in fs]
    results = []
    for backend, dtype in (("cpu", torch.float32), ("torch", torch.float64)):
        xs = [f.detach().to(dtype).requires_grad_() for f in fs]
        with kdfast.use_backend(backend):
            loss = KF.attention_transfer(xs, [f.to(dtype) for f in ft], p=p)
        loss.backward()
        results.append((loss.detach(), [x.grad for x in xs]))
    (loss, grads), (ref_loss, ref_grads) = results
    assert_close(loss, ref_loss, LOSS_TOLERANCE[torch.float32], "loss")
    for grad, ref in zip(grads, ref_grads):
        assert_close(grad, ref, TOLERANCE[torch.float32], "grad")


@pytest.mark.skipif(not all(shutil.which(tool) for tool in ("objdump", "nm")) or platform.machine() != "x86_64",
                    reason="needs binutils on x86-64")
def test_no_avx_instructions_outside_the_avx_builds():
    # What lets kdfast._C load and run its DEFAULT build on a CPU without AVX: outside the
    # AVX2/AVX512 builds' namespaces, no shared function (one the linker may have taken from
    # any object) and no static initializer (run at load) touches a ymm or zmm register.
    # Functions local to one object (e.g. GCC's .constprop clones) run only from its code.
    import kdfast._C

    library = kdfast._C.__file__
    types = {}
    for line in subprocess.run(["nm", "--defined-only", library], capture_output=True, text=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            types[parts[2]] = parts[1]
    offenders, name = set(), None
    disassembly = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True)
    for line in disassembly.stdout.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if header:
            name = header.group(1)
        elif name and re.search(r"%[yz]mm\d", line) and "AVX2" not in name and "AVX512" not in name:
            shared = types.get(name, "t") in "TWVui"
            if shared or name.startswith("_GLOBAL__sub_I"):
                offenders.add(name)
    assert disassembly.returncode == 0 and name is not None
    assert not offenders, f"AVX code outside the AVX builds: {sorted(offenders)[:10]}"


@pytest.mark.parametrize("loss", ["rkd", "pkt", "similarity_preserving"])
def test_relational_losses_on_every_build(capability, loss):
    g = torch.Generator().manual_seed(3)
    e_s, e_t = torch.randn(19, 2, 4, 5, generator=g), torch.randn(19, 3, 4, 5, generator=g)
    fn = getattr(KF, loss)
    results = []
    for backend, dtype in (("cpu", torch.float32), ("torch", torch.float64)):
        x = e_s.detach().to(dtype).requires_grad_()
        with kdfast.use_backend(backend):
            value = fn(x, e_t.to(dtype))
        value.backward()
        results.append((value.detach(), x.grad))
    (value, grad), (ref_value, ref_grad) = results
    assert_close(value, ref_value, LOSS_TOLERANCE[torch.float32], "loss")
    assert_close(grad, ref_grad, TOLERANCE[torch.float32], "grad")
