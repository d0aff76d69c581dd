"""rkd / rkd_distance / rkd_angle / pkt / similarity_preserving: every backend against the
float64 canonical implementation (kdfast.ops.relational's *_ref)."""
import pytest
import torch

import kdfast
from kdfast import _backend
from kdfast import functional as KF
from kdfast._verify import RELATIONAL_FLOOR, RELATIONAL_LOSS_TOLERANCE
from kdfast.ops import relational as op
from helpers import DTYPES, TOLERANCE, assert_close, assert_compiled_matches_eager, backend_params



BACKENDS = backend_params(op.KERNELS)

# name: (kdfast function, canonical reference), both called as f(e_s, e_t)
LOSSES = {
    "rkd": (lambda s, t: KF.rkd(s, t, dist_weight=25, angle_weight=50), lambda s, t: op.rkd_ref(s, t, 25, 50)),
    "rkd_distance": (KF.rkd_distance, op.rkd_distance_ref),
    "rkd_angle": (KF.rkd_angle, op.rkd_angle_ref),
    "pkt": (KF.pkt, op.pkt_ref),
    "similarity": (KF.similarity_preserving, op.similarity_preserving_ref),
    "similarity_p1": (lambda s, t: KF.similarity_preserving(s, t, p=1),
                      lambda s, t: op.similarity_preserving_ref(s, t, p=1)),
    "similarity_p3.5": (lambda s, t: KF.similarity_preserving(s, t, p=3.5),
                        lambda s, t: op.similarity_preserving_ref(s, t, p=3.5)),
}
# (student shape, teacher width): B = 2, odd sizes, [B, C, H, W] features
CASES = [((2, 5), 3), ((7, 3, 2, 2), 9), ((19, 40), 13)]
# Larger shapes for the GPU kernels' tiles (64 and more, not multiples of them)
GPU_CASES = [((130, 300), 70), ((257, 64), 96)]
# A kernel's error against float64 may reach twice the error of the reference run in the
# input's precision, or the floors of kdfast._verify's table for the relational losses.
LOSS_FLOOR = RELATIONAL_LOSS_TOLERANCE


def make(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def run(fn, backend, s, t, grad_out=1.7):
    """Loss and student gradient (for an incoming gradient grad_out) on a backend."""
    s = s.detach().clone().requires_grad_()
    with kdfast.use_backend(backend):
        loss = fn(s, t)
    (loss * grad_out).backward()
    return loss.detach(), s.grad


# Scale under which errors count as absolute: RKD at B = 2 is 0 (one distance, one angle).
TINY = RELATIONAL_FLOOR


def rel_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(TINY)).item()


def close(actual, expected, tol, what):
    assert_close(actual, expected, tol, what, floor=TINY)


def check_against_reference(name, backend, s, t, grad_out=1.7):
    fn, ref = LOSSES[name]
    loss, grad = run(fn, backend, s, t, grad_out)
    ref_loss, ref_grad = run(ref, "torch", s.double(), t.double(), grad_out)
    own_loss, own_grad = run(ref, "torch", s, t, grad_out)  # the reference in the input's precision
    assert loss.dtype == (torch.float64 if s.dtype == torch.float64 else torch.float32)
    assert grad.dtype == s.dtype and grad.shape == s.shape
    loss_tol = max(LOSS_FLOOR[s.dtype], 2 * rel_error(own_loss, ref_loss))
    grad_tol = max(TOLERANCE[s.dtype], 2 * rel_error(own_grad, ref_grad))
    close(loss, ref_loss, loss_tol, f"{name} loss")
    close(grad, ref_grad, grad_tol, f"{name} grad")


@pytest.mark.gpu_core
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("shape,teacher_width", CASES, ids=str)
def test_matches_reference(device, backend, dtype, name, shape, teacher_width):
    s = make(shape, dtype, device, seed=1)
    t = make((shape[0], teacher_width), dtype, device, seed=2)
    check_against_reference(name, backend, s, t)


@pytest.mark.gpu_core
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["rkd", "pkt", "similarity", "similarity_p1"])
@pytest.mark.parametrize("shape,teacher_width", GPU_CASES, ids=str)
def test_gpu_tiles_match_reference(backend, dtype, name, shape, teacher_width):
    s = make(shape, dtype, "cuda", seed=3)
    t = make((shape[0], teacher_width), dtype, "cuda", seed=4)
    check_against_reference(name, backend, s, t)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_channels_last_and_mixed_dtypes(device, backend, name):
    s = make((6, 4, 3, 3), torch.float32, device, seed=5).to(memory_format=torch.channels_last)
    t = make((6, 8), torch.bfloat16, device, seed=6)
    check_against_reference(name, backend, s, t.float())  # the teacher is exact in float32
    fn, _ = LOSSES[name]
    with kdfast.use_backend(backend):
        mixed, as_float = fn(s, t), fn(s, t.float())
    assert mixed.dtype == torch.float32
    assert_close(mixed, as_float, 1e-6, "bfloat16 teacher")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["rkd", "rkd_distance", "rkd_angle", "pkt"])
def test_duplicate_samples_in_both_models(device, backend, dtype, name):
    """Equal rows: pdist's clamp (distance 1e-6) and a zero normalised difference, with the
    reference's gradient (zero through the coincident pairs)."""
    s = make((9, 20), dtype, device, seed=7)
    t = make((9, 12), dtype, device, seed=8)
    for x in (s, t):
        x[1] = x[0]
        x[3] = x[0]
    check_against_reference(name, backend, s, t)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_duplicate_samples_in_the_student_only(device, backend):
    """The reference's loss; its gradient through F.normalize of a zero vector is divided by
    the eps 1e-12 (~1e11 here), kdfast treats the coincident pair as a constant instead:
    finite, and equal to the reference on the samples it does not touch."""
    s = make((9, 20), torch.float64, device, seed=9)
    t = make((9, 12), torch.float64, device, seed=10)
    s[5] = s[4]
    fn, ref = LOSSES["rkd"]
    loss, grad = run(fn, backend, s, t)
    ref_loss, ref_grad = run(ref, "torch", s, t)
    assert_close(loss, ref_loss, 1e-10, "loss")
    assert ref_grad[4:6].abs().max() > 1e9 and torch.isfinite(grad).all() and grad[4:6].abs().max() < 10
    others = [i for i in range(9) if i not in (4, 5)]
    assert_close(grad[others], ref_grad[others], 1e-8, "grad of the other samples")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("name,weights", [("rkd", (25.0, 50.0)), ("rkd_distance", (1.0, 0.0)),
                                          ("rkd_angle", (0.0, 1.0))])
def test_large_common_offset_keeps_float32_accuracy(device, backend, name, weights):
    """Embeddings ~1e3 from the origin, spread ~1: a float32 Gram of the raw embeddings loses
    ~1e-3 to cancellation (as the reference's pdist does); the centred one keeps float32
    accuracy."""
    g = torch.Generator().manual_seed(11)
    offset = torch.randn(64, generator=g, dtype=torch.float64)
    s = (1e3 * offset / offset.norm() + torch.randn(8, 64, generator=g, dtype=torch.float64)).float().to(device)
    t = (1e3 * offset.flip(0) / offset.norm() + torch.randn(8, 64, generator=g, dtype=torch.float64)).float().to(device)
    fn, ref = LOSSES[name]
    loss, grad = run(fn, backend, s, t)
    ref_loss, ref_grad = run(ref, "torch", s.double(), t.double())
    close(loss, ref_loss, 1e-5, "loss")
    close(grad, ref_grad, 1e-5, "grad")
    uncentred, _ = op.KERNELS("rkd_gram", backend)(s @ s.t(), t @ t.t(), *weights, op.coincidence_tol(s.dtype, 64),
                                                   False)
    assert rel_error(uncentred, ref_loss) > 1e-4
    if name != "rkd_angle":  # the reference's own pdist cancels too
        assert rel_error(run(ref, "torch", s, t)[0], ref_loss) > 1e-4


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_nan_input(device, backend):
    """A NaN gives a NaN RKD / similarity loss; PKT, like the canonical code, counts a sample
    with a NaN or infinite value as a zero vector."""
    s = make((6, 10), torch.float32, device, seed=12)
    t = make((6, 10), torch.float32, device, seed=13)
    s[2, 3] = float("nan")
    t[4, 0] = float("inf")
    with kdfast.use_backend(backend):
        assert torch.isnan(KF.rkd(s, t)) and torch.isnan(KF.similarity_preserving(s, t))
        value = KF.pkt(s, t)
    assert_close(value, op.pkt_ref(s.double(), t.double()), 1e-5, "pkt")


@pytest.mark.parametrize("device,backend", BACKENDS + [pytest.param("cpu", "torch", id="cpu-torch")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
def test_pkt_gradient_of_a_sample_with_nan_or_inf(device, backend, bad):
    """A NaN or inf at (i, j) of the student: as in the reference, row i of the gradient is
    NaN and every other sample's gradient is finite and the reference's (the kernels' S e_s
    once put NaN in column j of every sample). A bad teacher sample leaves it all finite."""
    s = make((6, 10), torch.float32, device, seed=12)
    t = make((6, 10), torch.float32, device, seed=13)
    s[2, 3] = bad
    t[4, 0] = bad
    loss, grad = run(KF.pkt, backend, s, t)
    ref_loss, ref_grad = run(op.pkt_ref, "torch", s.double(), t.double())
    others = torch.arange(6, device=device) != 2
    assert torch.isnan(grad[2]).all() and torch.isnan(ref_grad[2]).all()
    assert torch.isfinite(grad[others]).all()
    close(loss, ref_loss, 1e-5, "loss")
    close(grad[others], ref_grad[others], 1e-5, "grad of the other samples")


@pytest.mark.gpu_core
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck(device, backend, name):
    s = make((5, 4), torch.float64, device, seed=14).requires_grad_()
    t = make((5, 3), torch.float64, device, seed=15)
    fn, _ = LOSSES[name]

    def f(x):
        with kdfast.use_backend(backend):
            return fn(x, t)

    assert torch.autograd.gradcheck(f, (s,))


@pytest.mark.gpu_core
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck(device, backend):
    s = make((6, 7), torch.float32, device, seed=16).requires_grad_()
    t = make((6, 5), torch.float32, device, seed=17)
    for student, compute_grad in ((s, True), (s.detach(), False)):
        torch.library.opcheck(torch.ops.kdfast.rkd.default, (student, t, 25.0, 50.0, compute_grad, backend))
        torch.library.opcheck(torch.ops.kdfast.pkt.default, (student, t, 1e-7, compute_grad, backend))
        torch.library.opcheck(torch.ops.kdfast.similarity_preserving.default,
                              (student, t, 2.0, compute_grad, backend))


@pytest.mark.compile
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    s = make((8, 12), torch.float32, device, seed=18).requires_grad_()
    t = make((8, 6), torch.float32, device, seed=19)

    def loss_fn(s, t):
        return KF.rkd(s, t) + 3.0 * KF.pkt(s, t) + KF.similarity_preserving(s, t) * 0.5

    assert_compiled_matches_eager(loss_fn, [s], [t], backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("name", ["rkd", "pkt", "similarity"])
def test_teacher_gets_no_gradient(device, backend, name):
    s = make((5, 8), torch.float32, device, seed=20).requires_grad_()
    t = make((5, 8), torch.float32, device, seed=21).requires_grad_()
    with kdfast.use_backend(backend):
        LOSSES[name][0](s, t).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_backward_twice_with_retain_graph(device, backend):
    s = make((5, 8), torch.float32, device, seed=22).requires_grad_()
    t = make((5, 8), torch.float32, device, seed=23)
    with kdfast.use_backend(backend):
        loss = KF.rkd(s, t) + KF.pkt(s, t)
    first = torch.autograd.grad(loss, s, retain_graph=True)[0]
    second = torch.autograd.grad(2 * loss, s)[0]
    assert_close(second, 2 * first, 1e-6, "second backward")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("name", ["rkd", "pkt", "similarity"])
def test_inside_autocast(device, backend, name):
    """Under autocast (bfloat16 matmuls) the Grams and the gradient stay in float32."""
    s = make((6, 10), torch.float32, device, seed=26)
    t = make((6, 10), torch.float32, device, seed=27)
    fn, _ = LOSSES[name]
    plain, plain_grad = run(fn, backend, s, t)
    with torch.autocast(device, dtype=torch.bfloat16):
        cast, cast_grad = run(fn, backend, s, t)
    assert cast.dtype == torch.float32 and cast_grad.dtype == torch.float32
    close(cast, plain, 1e-6, "loss")
    close(cast_grad, plain_grad, 1e-6, "grad")


def test_no_grad_skips_the_gradient():
    s = make((5, 8), torch.float32, "cpu", seed=24).requires_grad_()
    t = make((5, 8), torch.float32, "cpu", seed=25)
    with torch.no_grad():
        loss = KF.rkd(s, t)
    assert loss.grad_fn is None and torch.isfinite(loss)
    assert_close(loss, op.rkd_ref(s.detach().double(), t.double()), 1e-5, "loss")


def test_auto_picks_the_fused_kernels():
    expected = "cpu" if _backend.PLATFORM_REASONS["cpu"] is None else "torch"
    assert _backend.select_backend("rkd", op.KERNELS, torch.device("cpu")) == expected
    if torch.cuda.is_available():
        assert _backend.select_backend("rkd", op.KERNELS, torch.device("cuda")) in ("cuda", "triton")


def test_batch_of_one_is_a_clear_error():
    with pytest.raises(ValueError, match=r"rkd: a batch of 1 sample.*at least 2"):
        KF.rkd(torch.randn(1, 8), torch.randn(1, 8))


def test_bad_similarity_power_is_a_clear_error():
    with pytest.raises(ValueError, match=r"p must be a number > 0"):
        KF.similarity_preserving(torch.randn(3, 8), torch.randn(3, 8), p=0)


def test_split_bfloat16_matmuls_keep_float32_accuracy():
    """The GPU's tensor-core path for low-precision inputs (bfloat16 hi + lo halves), run here
    with the same products: Gram and input gradient close to float32's."""
    g = torch.Generator().manual_seed(26)
    x = torch.randn(40, 300, generator=g, dtype=torch.float64)
    S = torch.randn(40, 40, generator=g, dtype=torch.float64)
    gram = op._gram_block(x.float(), split=True)
    assert gram.dtype == torch.float32
    assert_close(gram, x @ x.t(), 1e-5, "split Gram")
    assert_close(op._gram_block(x.bfloat16(), split=True), x.bfloat16().double() @ x.bfloat16().double().t(), 1e-6,
                 "bfloat16 Gram")
    assert_close(op._grad_block(S.float(), x.float(), split=True), S @ x, 1e-5, "split gradient")
    assert_close(op._grad_block(S.float(), x.bfloat16(), split=True), S @ x.bfloat16().double(), 1e-5,
                 "split gradient, bfloat16 input")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("loss", [KF.rkd, KF.pkt, KF.similarity_preserving], ids=lambda f: f.__name__)
def test_low_precision_embeddings_converted_in_column_blocks(monkeypatch, dtype, loss):
    """Low-precision embeddings reach the matmuls in blocks of columns (bounded float32
    temporaries): the loss and gradient are those of one block, up to float32 rounding."""
    g = torch.Generator().manual_seed(27)
    e_s = (torch.randn(7, 45, generator=g) + 3).to(dtype)
    e_t = (torch.randn(7, 33, generator=g) - 2).to(dtype)

    def run():
        s = e_s.clone().requires_grad_()
        with kdfast.use_backend("cpu" if _backend.unavailable_reason("cpu", "cpu", op.KERNELS) is None else "torch"):
            value = loss(s, e_t)
        value.backward()
        return value.detach(), s.grad

    whole = run()
    monkeypatch.setattr(op, "UPCAST_BLOCK", 7 * 10)  # 10 columns a block: 5 and 4 blocks
    assert len(op._column_blocks(e_s, torch.float32)) == 5
    blocks = run()
    assert_close(blocks[0], whole[0], 1e-5, "loss", floor=1e-3)  # PKT's is ~1e-5: its terms cancel
    assert_close(blocks[1].double(), whole[1].double(), TOLERANCE[dtype], "gradient")
