"""soft_target_kl / decoupled_kd: every backend against the float64 reference."""
import pytest
import torch

import kdfast
from kdfast import functional as KF
from kdfast.ops import softmax_kl as op
from helpers import (DTYPES, LOSS_TOLERANCE, TOLERANCE, assert_close, assert_compiled_matches_eager, backend_params,
                     kernel_backends, make_logits)

CASES = [  # (shape, dim): odd vocabularies, [B, T, V], segmentation [B, C, H, W] with dim=1
    ((41, 1271), -1),
    ((3, 2), 1),
    ((1, 7), -1),
    ((2, 5, 33), -1),
    ((2, 5, 3, 4), 1),
    ((2, 3, 9), 0),
]
LAYOUTS = ["contiguous", "strided", "permuted"]


BACKENDS = backend_params(op.KERNELS)


make = make_logits


def reference(s, t, grad_out, **kw):
    """Float64 loss and student gradient, through autograd of the reference."""
    s64 = s.detach().double().requires_grad_()
    kw = {"target": None, "ignore_index": -100, "decoupled": False, "alpha": 1.0, "beta": 8.0,
          "normalize": False, **kw}
    kw["dim"] = kw["dim"] % s.dim()
    loss = op.softmax_kl_ref(s64, t.detach().double(), **kw)
    (loss * grad_out.double()).sum().backward()
    return loss.detach(), s64.grad


def run(backend, s, t, grad_out, fn=KF.soft_target_kl, **kw):
    s = s.detach().requires_grad_()
    with kdfast.use_backend(backend):
        loss = fn(s, t, **kw)
    (loss * grad_out.to(loss.dtype)).sum().backward()
    return loss.detach(), s.grad


@pytest.mark.gpu_core
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", CASES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_soft_target_kl_matches_reference(device, backend, dtype, shape, dim, layout):
    s = make(shape, dtype, device, layout, seed=1)
    t = make(shape, dtype, device, "contiguous", seed=2)
    grad_out = torch.tensor(1.7, device=device)  # not 1: the saved gradient is scaled
    loss, grad = run(backend, s, t, grad_out, T=2.5, dim=dim)
    ref_loss, ref_grad = reference(s, t, grad_out, T=2.5, dim=dim, reduction="batchmean")
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.shape == s.shape
    assert_close(loss, ref_loss, LOSS_TOLERANCE[dtype], "loss")
    assert_close(grad, ref_grad, TOLERANCE[dtype], "grad")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("shape,dim", [((4, 5, 17), -1), ((2, 6, 3, 5), 1)], ids=str)
def test_reductions(device, backend, reduction, shape, dim):
    s, t = make(shape, torch.float32, device, seed=3), make(shape, torch.float32, device, seed=4)
    rows = shape[:dim % len(shape)] + shape[dim % len(shape) + 1:]
    grad_out = torch.rand(rows if reduction == "none" else (), device=device) + 0.5
    loss, grad = run(backend, s, t, grad_out, T=3.0, dim=dim, reduction=reduction)
    ref_loss, ref_grad = reference(s, t, grad_out, T=3.0, dim=dim, reduction=reduction)
    assert_close(loss, ref_loss, 1e-5, "loss")
    assert_close(grad, ref_grad, 1e-5, "grad")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_ignore_index_leaves_rows_out(device, backend, reduction):
    B, L, V = 3, 6, 50
    s, t = make((B, L, V), torch.float32, device, seed=5), make((B, L, V), torch.float32, device, seed=6)
    target = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(0)).to(device)
    target[0, :4] = -1
    target[2, 1] = -1
    s[0, 0, 3] = float("nan")  # inside an ignored row: must not leak
    rows = (B, L) if reduction == "none" else ()
    grad_out = torch.rand(rows, device=device) + 0.5
    loss, grad = run(backend, s, t, grad_out, T=2.0, reduction=reduction, target=target, ignore_index=-1)
    ref_loss, ref_grad = reference(s, t, grad_out, T=2.0, dim=-1, reduction=reduction, target=target,
                                   ignore_index=-1)
    assert_close(loss, ref_loss, 1e-5, "loss")
    assert_close(grad, ref_grad, 1e-5, "grad")
    assert torch.all(grad[target == -1] == 0)
    if reduction in ("batchmean", "mean"):  # divides by the 13 rows kept, not by B or B*L
        kept = (target != -1).sum()
        manual = op.soft_target_kl_ref(s.double().nan_to_num(), t.double(), 2.0)[target != -1].sum() / kept
        assert_close(loss, manual, 1e-5, "kept-rows mean")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_all_rows_ignored_gives_zero(device, backend):
    s, t = make((4, 9), torch.float32, device, seed=7), make((4, 9), torch.float32, device, seed=8)
    target = torch.full((4,), -100, device=device)
    loss, grad = run(backend, s, t, torch.tensor(1.0, device=device), target=target)
    assert loss.item() == 0.0 and torch.all(grad == 0)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("T", [0.1, 1.0, 4.0, 100.0])
def test_extreme_logits(device, backend, T):
    s, t = make((6, 300), torch.float32, device, seed=9), make((6, 300), torch.float32, device, seed=10)
    s[0, 5], t[0, 7] = 1e4, -1e4
    s[1, :] *= 3000
    t[2, 10:20] = float("-inf")  # masked classes of the teacher
    s[3, 0:5] = float("-inf")
    t[3, 0:5] = float("-inf")  # masked in both
    s[4, :] = -1e4
    t[4, :] = 1e4
    grad_out = torch.tensor(0.3, device=device)
    loss, grad = run(backend, s, t, grad_out, T=T)
    ref_loss, ref_grad = reference(s, t, grad_out, T=T, dim=-1, reduction="batchmean")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close(loss, ref_loss, 1e-5, "loss")
    assert_close(grad, ref_grad, 1e-5, "grad")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_student_minus_inf_where_teacher_has_mass_is_infinite(device, backend):
    s, t = make((2, 10), torch.float32, device, seed=11), make((2, 10), torch.float32, device, seed=12)
    s[1, 4] = float("-inf")
    loss, _ = run(backend, s, t, torch.tensor(1.0, device=device), reduction="none")
    assert torch.isfinite(loss[0]) and loss[1].item() == float("inf")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_nan_input_gives_nan_loss(device, backend):
    s, t = make((3, 10), torch.float32, device, seed=13), make((3, 10), torch.float32, device, seed=14)
    t[1, 2] = float("nan")
    with kdfast.use_backend(backend):
        rows = KF.soft_target_kl(s, t, reduction="none")
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


@pytest.mark.gpu_core
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("shape,dim", [((37, 101), -1), ((2, 5, 3, 4), 1)], ids=str)
def test_decoupled_kd_matches_reference(device, backend, dtype, normalize, shape, dim):
    s, t = make(shape, dtype, device, seed=15), make(shape, dtype, device, seed=16)
    d = dim % len(shape)
    rows = shape[:d] + shape[d + 1:]
    target = torch.randint(0, shape[d], rows, generator=torch.Generator().manual_seed(1)).to(device)
    target.view(-1)[0] = -100
    grad_out = torch.tensor(0.7, device=device)
    kw = dict(T=4.0, alpha=1.5, beta=6.0, normalize=normalize, dim=dim)
    loss, grad = run(backend, s, t, grad_out, fn=KF.decoupled_kd, target=target, **kw)
    ref_loss, ref_grad = reference(s, t, grad_out, target=target, decoupled=True, reduction="batchmean", **kw)
    assert_close(loss, ref_loss, max(LOSS_TOLERANCE[dtype], 1e-5 if dtype != torch.float64 else 0), "loss")
    assert_close(grad, ref_grad, max(TOLERANCE[dtype], 1e-5 if dtype != torch.float64 else 0), "grad")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_decoupled_kd_confident_target(device, backend):
    """p_target -> 1 and -> 0 hit the 1e-7 clamp of TCKD; the kernels' exact log-odds agree."""
    s, t = make((4, 20), torch.float64, device, seed=17), make((4, 20), torch.float64, device, seed=18)
    target = torch.tensor([0, 1, 2, 3], device=device)
    s[0, 0] = 80.0
    t[1, 1] = 90.0
    s[2, 2] = -80.0
    grad_out = torch.tensor(1.0, device=device, dtype=torch.float64)
    loss, grad = run(backend, s, t, grad_out, fn=KF.decoupled_kd, target=target, T=1.0)
    ref_loss, ref_grad = reference(s, t, grad_out, target=target, decoupled=True, T=1.0, dim=-1,
                                   reduction="batchmean")
    assert_close(loss, ref_loss, 1e-6, "loss")
    assert_close(grad, ref_grad, 1e-6, "grad")


@pytest.mark.gpu_core
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_gradcheck(device, backend, reduction):
    s = make((4, 7), torch.float64, device, seed=19).requires_grad_()
    t = make((4, 7), torch.float64, device, seed=20)
    target = torch.tensor([1, 0, -100, 6], device=device)

    def f(x):
        with kdfast.use_backend(backend):
            return (KF.soft_target_kl(x, t, T=1.7, reduction=reduction, target=target),
                    KF.decoupled_kd(x, t, target, T=2.2, reduction=reduction))

    assert torch.autograd.gradcheck(f, (s,))


@pytest.mark.gpu_core
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("decoupled", [False, True])
def test_opcheck(device, backend, decoupled):
    s = make((6, 35), torch.float32, device, seed=21).requires_grad_()
    t = make((6, 35), torch.float32, device, seed=22)
    target = torch.tensor([0, 3, -100, 34, 7, 7], device=device)
    for reduction in ("batchmean", "none"):
        args = (s, t, target, 1, 3.0, -100, "forward_kl", 0.5, decoupled, 1.0, 8.0, reduction, 1.0, None, True,
                backend)
        torch.library.opcheck(torch.ops.kdfast.softmax_kl.default, args)


@pytest.mark.compile
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    s = make((8, 50), torch.float32, device, seed=23).requires_grad_()
    t = make((8, 50), torch.float32, device, seed=24)
    target = torch.arange(8, device=device)

    def loss_fn(s, t, target):
        return 0.5 * KF.soft_target_kl(s, t, T=4.0) + KF.decoupled_kd(s, t, target) * 1.3

    assert_compiled_matches_eager(loss_fn, [s], [t, target], backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_teacher_gets_no_gradient(device, backend):
    s = make((4, 9), torch.float32, device, seed=25).requires_grad_()
    t = make((4, 9), torch.float32, device, seed=26).requires_grad_()
    with kdfast.use_backend(backend):
        KF.soft_target_kl(s, t, T=2.0).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_mixed_dtypes_promote(device, backend):
    s = make((4, 33), torch.float32, device, seed=27)
    t = make((4, 33), torch.bfloat16, device, seed=28)
    grad_out = torch.tensor(1.0, device=device)
    loss, grad = run(backend, s, t, grad_out, T=2.0)
    ref_loss, ref_grad = reference(s, t, grad_out, T=2.0, dim=-1, reduction="batchmean")
    assert grad.dtype == torch.float32
    assert_close(loss, ref_loss, 1e-5, "loss")
    assert_close(grad, ref_grad, 1e-5, "grad")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_backward_twice_with_retain_graph(device, backend):
    """The gradient saved in forward survives a retained graph's backward."""
    s = make((4, 9), torch.float32, device, seed=29).requires_grad_()
    t = make((4, 9), torch.float32, device, seed=30)
    with kdfast.use_backend(backend):
        loss = KF.soft_target_kl(s, t)
    first = torch.autograd.grad(loss, s, retain_graph=True)[0]
    second = torch.autograd.grad(2 * loss, s, retain_graph=True)[0]
    third = torch.autograd.grad(loss, s)[0]  # graph freed: scaled in place
    assert torch.equal(second, 2 * first) and torch.equal(third, first)


def test_auto_uses_the_cpu_kernel_on_cpu():
    if kdfast._backend.PLATFORM_REASONS["cpu"] is not None:
        pytest.skip(kdfast._backend.PLATFORM_REASONS["cpu"])
    assert kdfast._backend.select_backend("soft_target_kl", op.KERNELS, torch.device("cpu")) == "cpu"


def test_no_grad_skips_the_gradient():
    s, t = make((4, 9), torch.float32, "cpu", seed=31), make((4, 9), torch.float32, "cpu", seed=32)
    s.requires_grad_()
    with torch.no_grad():
        loss = KF.soft_target_kl(s, t)
    assert loss.grad_fn is None and torch.isfinite(loss)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_vocabulary_beyond_256k(device, backend):
    V = 262147  # odd, larger than one block of any kernel
    s, t = make((2, V), torch.float32, device, seed=33), make((2, V), torch.float32, device, seed=34)
    grad_out = torch.tensor(1.0, device=device)
    loss, grad = run(backend, s, t, grad_out, T=2.0)
    ref_loss, ref_grad = reference(s, t, grad_out, T=2.0, dim=-1, reduction="batchmean")
    assert_close(loss, ref_loss, 1e-5, "loss")
    assert_close(grad, ref_grad, 1e-5, "grad")


# The CUDA kernels' launch plan (csrc/softmax_kl_plan.h) on an H200: static shared memory
# of the caching rows kernel and of the cluster kernel (ptxas -v for sm_90), per accumulation
# dtype, and the opt-in limit of shared memory per block.
H200_OPTIN = 232448
ROWS_STATIC = {False: 688, True: 1344}     # acc_double -> bytes
CLUSTER_STATIC = {False: 704, True: 1376}
PATHS = {0: "columns", 1: "rows-cached", 2: "rows-uncached", 3: "cluster"}


def launch_plan(V, elem_size, acc_double, vec=True, cc_major=9, optin=H200_OPTIN, clusters=True):
    values, name = torch.ops.kdfast_C.softmax_kl_launch_plan(
        V, elem_size, acc_double, vec, [cc_major, optin, ROWS_STATIC[acc_double], CLUSTER_STATIC[acc_double],
                                        int(clusters)])
    keys = ("path", "threads", "cluster", "slice", "dynamic_smem", "max_dynamic")
    return dict(zip(keys, values), name=name)


needs_extension = pytest.mark.skipif(not kdfast._extension.LOADED, reason="needs kdfast._C")


@needs_extension
@pytest.mark.parametrize("elem_size,acc_double", [(4, False), (2, False), (8, True)], ids=["fp32", "16-bit", "fp64"])
@pytest.mark.parametrize("cc_major,optin", [(9, H200_OPTIN), (8, 166912), (8, 101376)], ids=["H200", "A100", "sm86"])
def test_launch_plan_keeps_shared_memory_within_the_limits(elem_size, acc_double, cc_major, optin):
    """Every V: static + dynamic shared memory within the block's opt-in limit, dynamic
    memory within the kernel's attribute (raised once, never beyond opt-in - static), the
    row cached whenever it fits, and no more threads than the kernels' launch bounds."""
    static = {1: ROWS_STATIC[acc_double], 3: CLUSTER_STATIC[acc_double]}
    for V in [*range(1, 4096, 7), *range(2900, 13000, 3), *range(13000, 140000, 997), 262147]:
        for vec in (True, False):
            plan = launch_plan(V, elem_size, acc_double, vec, cc_major, optin)
            row_bytes = 2 * V * elem_size
            assert plan["threads"] <= (512 if acc_double else 1024)
            if plan["path"] in static:
                assert plan["dynamic_smem"] <= plan["max_dynamic"], (V, plan)
                assert static[plan["path"]] + plan["max_dynamic"] <= optin, (V, plan)
            if plan["path"] == 1:
                assert plan["dynamic_smem"] == row_bytes
            elif plan["path"] == 3:
                assert cc_major >= 9 and vec and plan["cluster"] * plan["slice"] >= V
                assert 2 * plan["slice"] * elem_size == plan["dynamic_smem"]
            else:  # read through L2: only a row that no block or cluster can cache
                assert row_bytes > min(100 * 1024, optin - static[1]), (V, plan)
                assert cc_major < 9 or not vec or row_bytes > 8 * 100 * 1024, (V, plan)


@needs_extension
@pytest.mark.parametrize("elem_size,acc_double,V,name", [
    (4, False, 6059, "rows-cached"), (4, False, 6144, "rows-cached"),    # static + dynamic > 48 KB
    (2, False, 12117, "rows-cached"), (2, False, 12288, "rows-cached"),
    (8, True, 2989, "rows-cached"), (8, True, 3072, "rows-cached"),
    (4, False, 12800, "rows-cached"), (4, False, 12801, "cluster-2"),    # 100 KB a block
    (4, False, 50000, "cluster-4"), (4, False, 51201, "cluster-8"), (4, False, 102400, "cluster-8"),
    (4, False, 102401, "rows-uncached"),
    (2, False, 51201, "cluster-4"), (2, False, 102400, "cluster-4"), (2, False, 128256, "cluster-8"),
    (8, True, 8000, "cluster-2"), (8, True, 20000, "cluster-4"), (8, True, 51200, "cluster-8"),
    (8, True, 51201, "rows-uncached"),
], ids=str)
def test_launch_plan_paths_on_an_h200(elem_size, acc_double, V, name):
    assert launch_plan(V, elem_size, acc_double)["name"] == name
    assert launch_plan(V + 1, elem_size, acc_double, vec=False)["name"].endswith("-scalar")
    if name.startswith("cluster"):  # clusters off (or unavailable): the rows kernel reads through L2
        assert launch_plan(V, elem_size, acc_double, clusters=False)["name"] == "rows-uncached"


def _cuda_path(s, t, dim=-1):
    return torch.ops.kdfast_C.softmax_kl_path(s, t, dim % s.dim(), True)


# (dtype, V, the CUDA kernel path on an H200): every path and its boundaries, including the
# rows of 6059-6144 (fp32), 12117-12288 (16-bit) and 2989-3072 (fp64) classes whose cache
# needs the static shared memory counted.
GPU_PATH_CASES = [
    (torch.float32, 6144, "rows-cached"), (torch.float32, 12288, "rows-cached"),
    (torch.float32, 20000, "cluster-2"), (torch.float32, 50000, "cluster-4"),
    (torch.float32, 60000, "cluster-8"), (torch.float32, 102400, "cluster-8"),
    (torch.float32, 128256, "rows-uncached"), (torch.float32, 300000, "rows-uncached"),
    (torch.bfloat16, 12288, "rows-cached"), (torch.bfloat16, 20000, "rows-cached"),
    (torch.bfloat16, 50000, "cluster-2"), (torch.bfloat16, 60000, "cluster-4"),
    (torch.bfloat16, 128256, "cluster-8"), (torch.bfloat16, 300000, "rows-uncached"),
    (torch.float16, 12117, "rows-cached-scalar"), (torch.float16, 12288, "rows-cached"),
    (torch.float16, 102400, "cluster-4"),
    (torch.float64, 3072, "rows-cached"), (torch.float64, 2989, "rows-cached-scalar"),
    (torch.float64, 8000, "cluster-2"), (torch.float64, 20000, "cluster-4"),
    (torch.float64, 50000, "cluster-8"), (torch.float64, 60000, "rows-uncached"),
]


def check_gpu_rows(backend, dtype, V, decoupled, N=6):
    s, t = make((N, V), dtype, "cuda", seed=35), make((N, V), dtype, "cuda", seed=36)
    target = torch.tensor([0, V - 1, 17, -100, 5, V // 2][:N], device="cuda")
    grad_out = torch.tensor(1.3, device="cuda")
    kw = dict(T=3.0, dim=-1, target=target)
    loss, grad = run(backend, s, t, grad_out, fn=KF.decoupled_kd if decoupled else KF.soft_target_kl, **kw)
    ref_loss, ref_grad = reference(s, t, grad_out, reduction="batchmean", decoupled=decoupled, **kw)
    assert_close(loss, ref_loss, 2e-5 if dtype != torch.float64 else LOSS_TOLERANCE[dtype], "loss")
    assert_close(grad, ref_grad, max(TOLERANCE[dtype], 1e-5 if dtype != torch.float64 else 0), "grad")
    return s, t


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_BACKENDS = kernel_backends("cuda", op.KERNELS) if torch.cuda.is_available() else []
ON_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.gpu
@pytest.mark.gpu_core
@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype,V,path", GPU_PATH_CASES, ids=str)
@pytest.mark.parametrize("decoupled", [False, True])
def test_gpu_kernel_paths(backend, dtype, V, path, decoupled):
    """Rows cached in one block, split over a cluster (sm_90), or read through L2."""
    s, t = check_gpu_rows(backend, dtype, V, decoupled)
    if backend == "cuda" and ON_SM90:
        assert _cuda_path(s, t) == path


@pytest.mark.gpu
@pytest.mark.gpu_core
@needs_gpu
@pytest.mark.skipif("cuda" not in GPU_BACKENDS, reason="needs the CUDA kernels")
@pytest.mark.parametrize("dtype,V", [(torch.float32, 60000), (torch.bfloat16, 60000), (torch.float64, 20000)],
                         ids=str)
def test_gpu_cluster_fallback(dtype, V):
    """Where clusters cannot run, rows of a cluster's size are read through L2."""
    previous = torch.ops.kdfast_C.softmax_kl_allow_clusters(False)
    try:
        s, t = check_gpu_rows("cuda", dtype, V, decoupled=True)
        assert _cuda_path(s, t) == "rows-uncached"
    finally:
        torch.ops.kdfast_C.softmax_kl_allow_clusters(previous)


@pytest.mark.gpu
@pytest.mark.gpu_core
@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(16, 1000, 32, 32), (4, 32003, 2, 3), (3, 21, 65, 67)], ids=str)
def test_gpu_columns_kernel(backend, dtype, shape):
    """[B, C, H, W] with dim=1: one thread per row, many rows, wide and odd class counts."""
    s, t = make(shape, dtype, "cuda", seed=37), make(shape, dtype, "cuda", seed=38)
    rows = (shape[0],) + shape[2:]
    target = torch.randint(0, shape[1], rows, generator=torch.Generator().manual_seed(2)).to("cuda")
    target[0, 0, :3] = -100
    grad_out = torch.tensor(0.9, device="cuda")
    kw = dict(T=2.0, dim=1, target=target)
    for fn, decoupled in ((KF.soft_target_kl, False), (KF.decoupled_kd, True)):
        loss, grad = run(backend, s, t, grad_out, fn=fn, **kw)
        ref_loss, ref_grad = reference(s, t, grad_out, reduction="batchmean", decoupled=decoupled, **kw)
        assert_close(loss, ref_loss, max(LOSS_TOLERANCE[dtype], 1e-5 if dtype != torch.float64 else 0), "loss")
        assert_close(grad, ref_grad, max(TOLERANCE[dtype], 1e-5 if dtype != torch.float64 else 0), "grad")
    if backend == "cuda":
        assert _cuda_path(s, t, 1) == "columns"
