"""attention_transfer / Attention: every backend against the float64 reference."""
import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast import functional as KF
from kdfast import losses as L
from kdfast.ops import attention as op
from helpers import (DTYPES, LOSS_TOLERANCE, TOLERANCE, assert_close, assert_compiled_matches_eager, backend_params,
                     kernel_backends)

CASES = [  # (batch, student channels, teacher channels, spatial)
    (2, 3, 5, (7, 7)),
    (3, 21, 6, (3, 5)),
    (2, 16, 8, (4, 4)),
    (2, 5, 3, (2, 3, 4)),
    (3, 6, 2, (9,)),
    (72, 3, 4, (5, 4)),  # many samples: the CPU kernel's one-region path
]
LAYOUTS = ["contiguous", "channels_last", "strided"]


BACKENDS = backend_params(op.KERNELS)


def make(shape, dtype, device, layout="contiguous", seed=0, positive=False):
    """Random features in the given memory layout (values do not depend on the layout)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if positive:  # for non-integer p (a negative base has no real power)
        x = x.abs() + 0.1
    x = x.to(dtype)
    if layout == "channels_last":  # channels innermost, whatever the number of spatial dims
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    elif layout == "strided":  # every other channel and position of a larger tensor
        big = torch.zeros((shape[0], 2 * shape[1]) + shape[2:-1] + (2 * shape[-1],), dtype=dtype)
        big[:, ::2, ..., ::2] = x
        x = big[:, ::2, ..., ::2]
    return x.to(device)


def reference(f_s, f_t, grad_out, p=2.0, pool=False):
    """Float64 loss and student gradients, through autograd of the reference."""
    xs = [f.detach().double().requires_grad_() for f in f_s]
    loss = 0
    for x, t in zip(xs, f_t):
        t = t.detach().double()
        s = x
        if pool:
            s, t = op.pool_to_match(s, t)
        loss = loss + op.attention_transfer_ref(s, t, p)
    (loss * grad_out.double()).backward()
    return loss.detach(), [x.grad for x in xs]


def own_error(f_s, f_t, p):
    """Relative error of the reference computed in the inputs' own precision (loss, grad)."""
    grad_out = torch.tensor(1.7, device=f_s.device)
    ref_loss, (ref_grad,) = reference([f_s], [f_t], grad_out, p=p)
    x = f_s.detach().clone().requires_grad_()
    loss = op.attention_transfer_ref(x, f_t, p)
    (loss * grad_out).backward()
    return max(((loss.double() - ref_loss).abs() / ref_loss.abs()).item(),
               ((x.grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item())


def run(backend, f_s, f_t, grad_out, **kw):
    f_s = [f.detach().requires_grad_() for f in f_s]
    with kdfast.use_backend(backend):
        loss = KF.attention_transfer(f_s, f_t, **kw)
    (loss * grad_out.to(loss.dtype)).backward()
    return loss.detach(), [f.grad for f in f_s]


def check(backend, f_s, f_t, dtype, p=2.0, tol=None, grad_scale=1.0, **kw):
    device = f_s[0].device
    grad_out = torch.tensor(1.7 * grad_scale, device=device)  # not 1: backward scales by it
    loss, grads = run(backend, f_s, f_t, grad_out, p=p, **kw)
    ref_loss, ref_grads = reference(f_s, f_t, grad_out, p=p, pool=kw.get("pool", False))
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(loss, ref_loss, tol or LOSS_TOLERANCE[dtype], "loss")
    for f, g, r in zip(f_s, grads, ref_grads):
        assert g.dtype == f.dtype and g.shape == f.shape
        assert_close(g, r, tol or TOLERANCE[dtype], "grad")


@pytest.mark.gpu_core
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference(device, backend, dtype, case, layout):
    B, cs, ct, spatial = case
    f_s = make((B, cs) + spatial, dtype, device, layout, seed=1)
    f_t = make((B, ct) + spatial, dtype, device, "contiguous", seed=2)
    check(backend, [f_s], [f_t], dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("p", [1.0, 3.0, 4.0, 2.5, 0.5, 11.0])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_any_power(device, backend, dtype, p, layout):
    positive = not float(p).is_integer()
    f_s = make((2, 5, 6, 5), dtype, device, layout, seed=3, positive=positive)
    f_t = make((2, 7, 6, 5), dtype, device, seed=4, positive=positive)
    # Large p makes the maps peaky and the normalisation's gradient cancel: allow 3x the
    # error of PyTorch's own computation in this dtype.
    tol = max(TOLERANCE[dtype], 3 * own_error(f_s, f_t, p))
    check(backend, [f_s], [f_t], dtype, p=p, tol=tol)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_pairs_in_one_call(device, backend, dtype, monkeypatch):
    """Three pairs of a resnet-like student/teacher, mixed layouts, in one fused call."""
    f_s = [make((2, 4, 8, 8), dtype, device, "channels_last", seed=5),
           make((2, 8, 4, 4), dtype, device, seed=6),
           make((2, 16, 2, 2), dtype, device, "strided", seed=7)]
    f_t = [make((2, 8, 8, 8), dtype, device, seed=8),
           make((2, 16, 4, 4), dtype, device, "channels_last", seed=9),
           make((2, 32, 2, 2), dtype, device, seed=10)]
    calls = []

    class CountingKernels(type(op.KERNELS)):
        def __call__(self, name, backend):
            calls.append(name)
            return super().__call__(name, backend)

    monkeypatch.setattr(op, "KERNELS", CountingKernels(op.KERNELS.family, op.KERNELS.triton_names))
    check(backend, f_s, f_t, dtype)
    assert calls == ["attention_transfer_forward", "attention_transfer_backward"]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("s_size,t_size", [((8, 8), (4, 4)), ((3, 3), (7, 7)), ((6, 8), (3, 5)), ((9,), (4,))],
                         ids=str)
def test_pool_matches_pooled_reference(device, backend, s_size, t_size):
    f_s = make((2, 3) + s_size, torch.float32, device, seed=11)
    f_t = make((2, 5) + t_size, torch.float32, device, seed=12)
    check(backend, [f_s], [f_t], torch.float32, pool=True)


def test_pool_is_repdistillers_adaptive_average_pooling():
    f_s, f_t = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    expected = op.attention_transfer_ref(F.adaptive_avg_pool2d(f_s, (4, 4)), f_t)
    assert_close(KF.attention_transfer(f_s, f_t, pool=True), expected, 1e-6, "loss")
    with pytest.raises(ValueError, match=r"spatial sizes differ: f_s \(2, 3, 8, 8\) vs f_t \(2, 5, 4, 4\).*pool=True"):
        KF.attention_transfer(f_s, f_t)


def test_loss_pool_option_and_error_names_the_layers():
    fm_s = {"layer1": torch.randn(2, 3, 8, 8), "layer2": torch.randn(2, 6, 4, 4)}
    fm_t = {"block1": torch.randn(2, 5, 8, 8), "block2": torch.randn(2, 7, 2, 2)}
    with pytest.raises(ValueError, match=r"fm_s\['layer2'\] \(2, 6, 4, 4\) vs fm_t\['block2'\] \(2, 7, 2, 2\)"):
        L.Attention(fm_s=fm_s, fm_t=fm_t)
    loss = L.Attention(fm_s=fm_s, fm_t=fm_t, pool=True)
    expected = (op.attention_transfer_ref(fm_s["layer1"], fm_t["block1"])
                + op.attention_transfer_ref(F.adaptive_avg_pool2d(fm_s["layer2"], (2, 2)), fm_t["block2"]))
    assert_close(loss, expected, 1e-6, "loss")
    assert repr(L.Attention(p=3, pool=True)) == "Attention(p=3, pool=True)"


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_one_by_one_maps_give_zero(device, backend):
    """A 1x1 map normalises to 1: no loss, no gradient (up to rounding)."""
    f_s = make((3, 20, 1, 1), torch.float32, device, seed=13).requires_grad_()
    f_t = make((3, 7, 1, 1), torch.float32, device, seed=14)
    with kdfast.use_backend(backend):
        loss = KF.attention_transfer(f_s, f_t)
    loss.backward()
    assert abs(loss.item()) < 1e-12 and f_s.grad.abs().max() < 1e-6


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_tiny_and_zero_maps_take_the_eps_branch(device, backend):
    """Maps with norm <= 1e-12 are divided by eps (F.normalize's clamp), not by their norm."""
    f_s = make((3, 4, 5, 5), torch.float64, device, seed=15)
    f_t = make((3, 6, 5, 5), torch.float64, device, seed=16)
    f_s[0] = 0
    f_s[1] *= 1e-7  # mean of squares ~1e-14: norm below eps
    f_t[2] = 0
    check(backend, [f_s], [f_t], torch.float64, tol=1e-9)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_teacher_gets_no_gradient(device, backend):
    f_s = make((2, 3, 4, 4), torch.float32, device, seed=17).requires_grad_()
    f_t = make((2, 5, 4, 4), torch.float32, device, seed=18).requires_grad_()
    with kdfast.use_backend(backend):
        KF.attention_transfer(f_s, f_t).backward()
    assert f_s.grad is not None and f_t.grad is None


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_mixed_dtypes_promote(device, backend):
    f_s = make((2, 3, 5, 5), torch.float32, device, seed=19)
    f_t = make((2, 4, 5, 5), torch.bfloat16, device, seed=20)
    check(backend, [f_s], [f_t], torch.float32, tol=1e-5)


@pytest.mark.gpu_core
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradcheck(device, backend):
    f_s = [make((2, 3, 3, 4), torch.float64, device, seed=21).requires_grad_(),
           make((2, 2, 2, 2), torch.float64, device, "channels_last", seed=22).requires_grad_()]
    f_t = [make((2, 4, 3, 4), torch.float64, device, seed=23), make((2, 3, 2, 2), torch.float64, device, seed=24)]

    def f(a, b):
        with kdfast.use_backend(backend):
            return KF.attention_transfer([a, b], f_t), KF.attention_transfer(a, f_t[0], p=3)

    assert torch.autograd.gradcheck(f, tuple(f_s))


@pytest.mark.gpu_core
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck(device, backend):
    f_s = [make((2, 3, 5, 5), torch.float32, device, seed=25).requires_grad_(),
           make((2, 4, 3, 3), torch.float32, device, "channels_last", seed=26).requires_grad_()]
    f_t = [make((2, 6, 5, 5), torch.float32, device, seed=27), make((2, 2, 3, 3), torch.float32, device, seed=28)]
    torch.library.opcheck(torch.ops.kdfast.attention_transfer.default, (f_s, f_t, 2.0, backend))
    positive = [f.detach().abs().requires_grad_() for f in f_s]  # p=2.5: real powers only
    torch.library.opcheck(torch.ops.kdfast.attention_transfer.default,
                          (positive, [f.abs() for f in f_t], 2.5, backend))
    _, maps = op.attention_transfer([f.detach() for f in f_s], f_t, 2.0, backend)
    grad_loss = torch.tensor(0.5, device=device)
    torch.library.opcheck(torch.ops.kdfast.attention_transfer_backward.default,
                          (grad_loss, [f.detach() for f in f_s], maps, 2.0, backend))


@pytest.mark.compile
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    f_s = [make((2, 3, 4, 4), torch.float32, device, seed=29).requires_grad_(),
           make((2, 5, 2, 2), torch.float32, device, seed=30).requires_grad_()]
    f_t = [make((2, 6, 4, 4), torch.float32, device, seed=31), make((2, 4, 2, 2), torch.float32, device, seed=32)]
    attention = L.Attention()

    def loss_fn(a, b):
        return 2.0 * attention(fm_s={"a": a, "b": b}, fm_t={"a": f_t[0], "b": f_t[1]})

    assert_compiled_matches_eager(loss_fn, f_s, [], backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_backward_twice_with_retain_graph(device, backend):
    f_s = make((2, 3, 4, 4), torch.float32, device, seed=33).requires_grad_()
    f_t = make((2, 5, 4, 4), torch.float32, device, seed=34)
    with kdfast.use_backend(backend):
        loss = KF.attention_transfer(f_s, f_t)
    first = torch.autograd.grad(loss, f_s, retain_graph=True)[0]
    second = torch.autograd.grad(2 * loss, f_s)[0]
    assert_close(second, 2 * first, 1e-6, "grad")


def test_auto_uses_the_cpu_kernel_on_cpu():
    if kdfast._backend.PLATFORM_REASONS["cpu"] is not None:
        pytest.skip(kdfast._backend.PLATFORM_REASONS["cpu"])
    assert kdfast._backend.select_backend("attention_transfer", op.KERNELS, torch.device("cpu")) == "cpu"


def test_no_grad_and_student_without_grad():
    f_s, f_t = make((2, 3, 4, 4), torch.float32, "cpu", seed=35), make((2, 5, 4, 4), torch.float32, "cpu", seed=36)
    expected = op.attention_transfer_ref(f_s, f_t)
    with torch.no_grad():
        assert_close(KF.attention_transfer(f_s.requires_grad_(), f_t), expected, 1e-6, "loss")
    loss = KF.attention_transfer(f_s.detach(), f_t)
    assert loss.grad_fn is None
    assert_close(loss, expected, 1e-6, "loss")


@pytest.mark.parametrize("call,pattern", [
    (lambda: KF.attention_transfer([torch.randn(2, 3, 4, 4)], [torch.randn(2, 3, 4, 4)] * 2),
     r"1 student maps and 2 teacher maps"),
    (lambda: KF.attention_transfer(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 8), pool=True),
     r"pool=True needs maps with the same number of spatial dims.*\(2, 3, 4, 4\).*\(2, 5, 8\)"),
    (lambda: KF.attention_transfer([torch.randn(2, 3, 4, 4)], [torch.randn(2, 5, 2, 2)]),
     r"f_s\[0\] \(2, 3, 4, 4\) vs f_t\[0\] \(2, 5, 2, 2\)"),
    (lambda: KF.attention_transfer(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4), p=float("inf")),
     r"p must be a number > 0, got inf"),
    (lambda: L.Attention(fm_s={"a": torch.randn(2, 3, 4, 4)}, fm_t={"b": torch.randn(3, 3, 4, 4)}),
     r"fm_s\['a'\] has batch size 2 and fm_t\['b'\] 3"),
])
def test_bad_input_gets_a_clear_error(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("spatial", [(64, 64), (63, 65)], ids=str)
def test_large_gradients_on_the_cpu(dtype, layout, spatial):
    """Gradients larger than the L2 caches are written with non-temporal stores (one
    thread: above 2 MB), aligned or not."""
    if kdfast._backend.PLATFORM_REASONS["cpu"] is not None:
        pytest.skip(kdfast._backend.PLATFORM_REASONS["cpu"])
    channels = 3 * 2 ** 20 // (8 * spatial[0] * spatial[1]) * 8 // (torch.finfo(dtype).bits // 8)
    f_s = make((2, channels) + spatial, dtype, "cpu", layout, seed=37)
    f_t = make((2, 7) + spatial, dtype, "cpu", seed=38)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # scaled as AMP scales losses: float16 gradients of such large maps would underflow
        check("cpu", [f_s], [f_t], dtype, grad_scale=2.0 ** 16)
    finally:
        torch.set_num_threads(threads)


GPU_BACKENDS = kernel_backends("cuda", op.KERNELS) if torch.cuda.is_available() else []
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.gpu_core
@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p", [2.0, 3.0])
def test_gpu_gradients_over_many_tiles(backend, dtype, layout, p):
    """Maps of 256 x 32 x 32 (and odd sizes): the gradient kernels' blocks take ~16K
    elements, so every sample spans many tiles of channels and positions."""
    f_s = [make((8, 256, 32, 32), dtype, "cuda", layout, seed=40),
           make((3, 130, 17, 9), dtype, "cuda", layout, seed=41)]
    f_t = [make((8, 64, 32, 32), dtype, "cuda", seed=42), make((3, 70, 17, 9), dtype, "cuda", seed=43)]
    tol = max(TOLERANCE[dtype], 3 * max(own_error(f_s[0], f_t[0], p), own_error(f_s[1], f_t[1], p)))
    check(backend, f_s, f_t, dtype, p=p, tol=max(tol, LOSS_TOLERANCE[dtype]))


@pytest.mark.gpu
@pytest.mark.gpu_core
@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_more_than_16_maps_in_one_call(backend, dtype):
    """20 layer pairs of mixed layouts and sizes: 40 maps forward, 20 backward, more than a
    launch's table holds (16), so the CUDA kernels take several launches."""
    layouts = ["contiguous", "channels_last", "strided"]
    f_s = [make((4, 8 + 4 * i, 6 + i % 5, 7), dtype, "cuda", layouts[i % 3], seed=50 + i) for i in range(20)]
    f_t = [make((4, 16 + i, 6 + i % 5, 7), dtype, "cuda", layouts[(i + 1) % 3], seed=80 + i) for i in range(20)]
    check(backend, f_s, f_t, dtype)
    if backend == "cuda":
        assert torch.ops.kdfast_C.attention_path(f_s, f_t, 2.0).endswith("/batched")
