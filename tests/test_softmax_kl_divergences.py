"""reverse_kl, jsd, tvd (and soft_target_kl) with dense and sparse (top-k) teachers: the
references against independent formulas and the analytic gradients the kernels use, every
backend against the float64 reference, gradcheck, opcheck, torch.compile."""
import math

import pytest
import torch

import kdfast
from kdfast import functional as KF
from kdfast.ops import softmax_kl as op
from helpers import (DEVICES, DTYPES, LOSS_TOLERANCE, TOLERANCE, NewTensorSpy, assert_close,
                     assert_compiled_matches_eager, kernel_backends, make_logits)

FUNCTIONS = {"forward_kl": KF.soft_target_kl, "reverse_kl": KF.reverse_kl, "jsd": KF.jsd, "tvd": KF.tvd}


def divergences(*pairs):
    return [pytest.param(name, beta, id=name if beta is None else f"{name}{beta}") for name, beta in pairs]


DIVERGENCES = divergences(("reverse_kl", None), ("jsd", 0.5), ("tvd", None))
ALL = divergences(("forward_kl", None)) + DIVERGENCES
# (another beta: the TRL tests, test_reductions_and_ignored_rows, the reference's tests)


def params(kernels, device):
    marks = [pytest.mark.gpu] if device == "cuda" else []
    return [pytest.param(device, b, marks=marks, id=f"{device}-{b}")
            for b in (["torch"] if device == "cpu" else []) + kernel_backends(device, kernels)]


BACKENDS = [p for d in DEVICES for p in params(op.KERNELS, d)]  # the torch reference and the kernels here


def loss_fn(divergence, beta):
    fn = FUNCTIONS[divergence]
    return (lambda s, t, **kw: fn(s, t, beta=beta, **kw)) if beta is not None else fn


make = make_logits


def run(backend, fn, s, teacher, grad_out, **kw):
    s = s.detach().requires_grad_()
    with kdfast.use_backend(backend):
        loss = fn(s, teacher, **kw)
    (loss * grad_out.to(loss.dtype)).sum().backward()
    return loss.detach(), s.grad


def reference(fn, s, teacher, grad_out, **kw):
    """The float64 loss and student gradient on the torch backend (autograd of the reference)."""
    if isinstance(teacher, kdfast.TopK):
        teacher = kdfast.TopK(teacher.indices, teacher.logprobs.double())
    else:
        teacher = teacher.double()
    return run("torch", fn, s.double(), teacher, grad_out.double(), **kw)


# ---------------------------------------------------------------------------------------
# The references: independent formulas, the analytic gradients of csrc/softmax_kl_math.h


def direct(divergence, beta, s, t, T):
    """Per row, straight from the definitions in linear space (float64, moderate logits)."""
    ps, pt = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
    if divergence == "forward_kl":
        return T * T * (pt * (pt / ps).log()).sum(-1)
    if divergence == "reverse_kl":
        return T * T * (ps * (ps / pt).log()).sum(-1)
    if divergence == "jsd":
        m = beta * pt + (1 - beta) * ps
        return T * T * (beta * (pt * (pt / m).log()).sum(-1) + (1 - beta) * (ps * (ps / m).log()).sum(-1))
    return T * 0.5 * (ps - pt).abs().sum(-1)


def analytic_grad(divergence, beta, s, t, T):
    """d(row loss)/ds from the closed forms the kernels use (the T-scaling included)."""
    q, p = torch.softmax(s / T, -1), torch.softmax(t / T, -1)  # student, teacher
    lq, lp = q.log(), p.log()
    if divergence == "forward_kl":
        return T * (q - p)
    if divergence == "reverse_kl":
        rkl = (q * (lq - lp)).sum(-1, keepdim=True)
        return T * q * ((lq - lp) - rkl)
    if divergence == "jsd":
        lm = (beta * p + (1 - beta) * q).log()
        kl_qm = (q * (lq - lm)).sum(-1, keepdim=True)
        return T * (1 - beta) * q * ((lq - lm) - kl_qm)
    sign = torch.sign(q - p)
    return 0.5 * q * (sign - (q * sign).sum(-1, keepdim=True))


@pytest.mark.parametrize("divergence,beta", ALL)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_reference_matches_definition_and_analytic_gradient(divergence, beta, T):
    s, t = make((5, 13), torch.float64, seed=1).requires_grad_(), make((5, 13), torch.float64, seed=2)
    rows = op.softmax_divergence_ref(s, t, divergence, beta if beta is not None else 0.5, T)
    assert_close(rows, direct(divergence, beta, s, t, T), 1e-12, "loss")
    (grad,) = torch.autograd.grad(rows.sum(), s)
    assert_close(grad, analytic_grad(divergence, beta, s.detach(), t, T), 1e-12, "grad")


def test_jsd_ends_are_the_kls_and_half_is_symmetric_and_bounded():
    s, t = make((6, 20), torch.float64, seed=3), make((6, 20), torch.float64, seed=4)
    with kdfast.use_backend("torch"):
        assert torch.equal(KF.jsd(s, t, beta=0, reduction="none"), KF.soft_target_kl(s, t, reduction="none"))
        assert torch.equal(KF.jsd(s, t, beta=1, reduction="none"), KF.reverse_kl(s, t, reduction="none"))
        half = KF.jsd(s, t, beta=0.5, reduction="none")
        assert_close(half, KF.jsd(t, s, beta=0.5, reduction="none"), 1e-12, "symmetry")
        assert bool((half > 0).all() and (half <= math.log(2)).all())
        # the ends are discontinuous: near 0, JSD ~ beta * forward KL, not forward KL
        s, t = s / 3, t / 3  # (the limit is reached once beta·p_t << (1 - beta)·p_s everywhere)
        near_zero = KF.jsd(s, t, beta=1e-6, reduction="none") / 1e-6
        assert_close(near_zero, KF.soft_target_kl(s, t, reduction="none"), 1e-4, "beta -> 0")
        near_one = KF.jsd(s, t, beta=1 - 1e-6, reduction="none") / 1e-6
        assert_close(near_one, KF.reverse_kl(s, t, reduction="none"), 1e-4, "beta -> 1")


def test_tvd_temperature_keeps_its_size():
    """T·TVD and its gradient tend to a limit as T grows (TVD alone shrinks like 1/T)."""
    s, t = make((4, 50), torch.float64, seed=5), make((4, 50), torch.float64, seed=6)
    with kdfast.use_backend("torch"):
        values = [KF.tvd(s, t, T=T).item() for T in (100.0, 1000.0)]
    assert abs(values[0] / values[1] - 1) < 0.05 and values[1] > 1e-3


# ---------------------------------------------------------------------------------------
# Dense teachers on every backend

CASES = [((37, 501), -1), ((1, 7), -1), ((2, 5, 33), -1), ((2, 5, 3, 4), 1)]


@pytest.mark.gpu_core
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", CASES, ids=str)
def test_matches_reference(device, backend, divergence, beta, dtype, shape, dim):
    layout = "permuted" if len(shape) > 2 else "strided"
    s = make(shape, dtype, device, layout, seed=7)
    t = make(shape, dtype, device, seed=8)
    grad_out = torch.tensor(1.7, device=device)
    fn = loss_fn(divergence, beta)
    loss, grad = run(backend, fn, s, t, grad_out, T=2.5, dim=dim)
    ref_loss, ref_grad = reference(fn, s, t, grad_out, T=2.5, dim=dim)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.shape == s.shape
    assert_close(loss, ref_loss, max(LOSS_TOLERANCE[dtype], 1e-5 if dtype != torch.float64 else 0), "loss")
    assert_close(grad, ref_grad, max(TOLERANCE[dtype], 1e-5 if dtype != torch.float64 else 0), "grad")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", divergences(("reverse_kl", None), ("jsd", 0.15), ("tvd", None)))
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_reductions_and_ignored_rows(device, backend, divergence, beta, reduction):
    B, L, V = 3, 5, 40
    s, t = make((B, L, V), device=device, seed=9), make((B, L, V), device=device, seed=10)
    target = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(0)).to(device)
    target[0, :3] = -100
    s[0, 1, 4] = float("nan")  # inside an ignored row: must not leak
    grad_out = torch.rand((B, L) if reduction == "none" else (), device=device) + 0.5
    fn = loss_fn(divergence, beta)
    loss, grad = run(backend, fn, s, t, grad_out, T=2.0, reduction=reduction, target=target)
    ref_loss, ref_grad = reference(fn, s, t, grad_out, T=2.0, reduction=reduction, target=target)
    assert_close(loss, ref_loss, 1e-5, "loss")
    assert_close(grad, ref_grad, 1e-5, "grad")
    assert torch.all(grad[target == -100] == 0)


# (The torch backend computes the definition, softmax(s/T), as written: at |s| ~ 1e4 in
# float32, s/T keeps ~1e-3 of absolute precision; the kernels centre each row first.)
@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "torch"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("T", [0.1, 1.0, 100.0])
def test_extreme_logits(device, backend, divergence, beta, T):
    s, t = make((7, 300), device=device, seed=11), make((7, 300), device=device, seed=12)
    s[0, 5], t[0, 7] = 1e4, -1e4
    s[1, :] *= 3000
    t[2, 10:20] = float("-inf")  # classes the teacher rules out
    if divergence == "reverse_kl":  # (where the student has mass, reverse KL is +inf: tested below)
        s[2, 10:20] = float("-inf")
    s[3, 0:5] = float("-inf")
    t[3, 0:5] = float("-inf")  # ruled out by both
    s[4, :] = -1e4
    t[4, :] = 1e4
    s[5, :] = t[5, :] + 1e4  # the same distribution, a constant apart: every term must cancel exactly
    grad_out = torch.tensor(0.3, device=device)
    fn = loss_fn(divergence, beta)
    loss, grad = run(backend, fn, s, t, grad_out, T=T, reduction="none")
    ref_loss, ref_grad = reference(fn, s, t, grad_out, T=T, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close(loss, ref_loss, 1e-5, "loss")
    # float32 keeps a row's divergence to ~1e-7 absolute (log Z terms); the uncentred form lost c/T·1e-7
    assert abs(loss[5] - ref_loss[5]) <= 2e-6 * op.divergence_scale(divergence, T) + 1e-4 * abs(ref_loss[5])
    if divergence == "tvd":  # (row 5: q = p up to rounding, where the sign of q - p, TVD's gradient, is noise)
        grad, ref_grad = grad[:5], ref_grad[:5]
    # (confident rows at T = 0.1 have gradients ~1e-16, where autograd of the float64
    # reference is itself ~1e-17 off: compared absolutely below 1e-10)
    assert_close(grad, ref_grad, 1e-5, "grad", floor=1e-10)


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "torch"])
@pytest.mark.parametrize("divergence,beta", ALL)
@pytest.mark.parametrize("tail", [None, "bucket", "renormalize"])
def test_loss_keeps_its_precision_when_the_student_sits_a_constant_above(device, backend, divergence, beta, tail):
    # Every divergence is invariant to a constant added to a student row; the kernels centre
    # each side on its own maximum (a sparse teacher's student on the maximum over its top-k
    # classes) before the terms meet, so float32 keeps the loss to its precision. A form
    # that summed (t - s)/T and added the maxima back cancelled two terms of size c/T
    # (forward KL: 5e-2 relative at c = 1e3).
    t = make((16, 100), torch.float32, device, seed=15)
    s = t + 0.5 * make((16, 100), torch.float32, device, seed=16) + 1e3
    T = 2.0 if tail != "bucket" else 1.0  # (the tail bucket is defined at T = 1)
    teacher = t if tail is None else kdfast.topk_logits(t, 10)
    kw = {"T": T} if tail is None else {"T": T, "tail": tail}
    fn = loss_fn(divergence, beta)
    with kdfast.use_backend(backend):
        loss = fn(s, teacher, **kw)
    exact = reference(fn, s, teacher, torch.tensor(1.0), **kw)[0]
    assert abs(loss.item() / exact.item() - 1) < 1e-4


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_student_ruling_out_teacher_mass_is_infinite(device, backend):
    s, t = make((2, 10), device=device, seed=13), make((2, 10), device=device, seed=14)
    t[1, 4] = float("-inf")  # reverse KL: the student puts mass where the teacher has none
    with kdfast.use_backend(backend):
        rows = KF.reverse_kl(s, t, reduction="none")
        assert torch.isfinite(rows[0]) and rows[1].item() == float("inf")
        assert torch.isfinite(KF.jsd(s, t, reduction="none")).all()  # m > 0 wherever either is
        assert torch.isfinite(KF.tvd(s, t, reduction="none")).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradcheck(device, backend):
    s = make((3, 5), torch.float64, device, seed=15).requires_grad_()
    t = make((3, 5), torch.float64, device, seed=16)
    target = torch.tensor([1, -100, 4], device=device)

    def f(x):
        with kdfast.use_backend(backend):
            return (KF.reverse_kl(x, t, T=1.7, target=target), KF.jsd(x, t, beta=0.3, T=0.9, reduction="none"),
                    KF.tvd(x, t, T=1.3))

    assert torch.autograd.gradcheck(f, (s,))


# ---------------------------------------------------------------------------------------
# Sparse (top-k) teachers


def explicit_topk(divergence, beta, s, indices, logprobs, T, tail):
    """Per row, the coarse distributions built entry by entry in float64, then `direct`."""
    rows = []
    for r in range(s.shape[0]):
        K = indices[r].tolist()
        lp = logprobs[r].double()
        if tail == "renormalize":
            P = torch.softmax(lp / T, 0)
            Q = torch.softmax(s[r, K] / T, 0)
        else:
            q = torch.softmax(s[r], 0)
            outside = [j for j in range(s.shape[1]) if j not in K]
            P = torch.cat([lp.exp(), (1 - lp.exp().sum()).clamp_min(0).view(1)])
            Q = torch.cat([q[K], q[outside].sum().view(1)])
        rows.append(direct(divergence, beta, Q.log().view(1, -1), P.log().view(1, -1), 1.0)[0])
    scale = op.divergence_scale(divergence, T)
    return scale * torch.stack(rows)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", ALL)
@pytest.mark.parametrize("tail,T", [("bucket", 1.0), ("renormalize", 1.0), ("renormalize", 2.0)])
def test_topk_matches_explicit_distributions(device, backend, divergence, beta, tail, T):
    N, V, k = 6, 23, 5
    s, t = make((N, V), torch.float64, seed=17), make((N, V), torch.float64, seed=18)
    topk = kdfast.topk_logits(t, k, dtype=torch.float64)
    s_leaf = s.clone().requires_grad_()
    expected = explicit_topk(divergence, beta, s_leaf, topk.indices, topk.logprobs, T, tail)
    (expected_grad,) = torch.autograd.grad(expected.sum() / N, s_leaf)
    fn = loss_fn(divergence, beta)
    loss, grad = run(backend, fn, s.to(device), kdfast.TopK(topk.indices.to(device), topk.logprobs.to(device)),
                     torch.tensor(1.0, device=device, dtype=torch.float64), T=T, tail=tail)
    assert_close(loss, expected.sum() / N, 1e-10, "loss")
    assert_close(grad, expected_grad.to(device), 1e-10, "grad")
    if tail == "renormalize":  # classes outside the top-k get no gradient
        outside = torch.ones(N, V, dtype=torch.bool).scatter(1, topk.indices.long(), False)
        assert torch.all(grad.cpu()[outside] == 0)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", ALL)
@pytest.mark.parametrize("tail,T", [("bucket", 1.0), ("renormalize", 3.0)])
def test_topk_with_every_class_is_dense(device, backend, divergence, beta, tail, T):
    s, t = make((9, 31), device=device, seed=19), make((9, 31), device=device, seed=20)
    fn = loss_fn(divergence, beta)
    grad_out = torch.tensor(1.0, device=device)
    dense = run(backend, fn, s, t, grad_out, T=T)
    sparse = run(backend, fn, s, kdfast.topk_logits(t, 31), grad_out, T=T, tail=tail)
    assert_close(sparse[0], dense[0], 2e-6, "loss")
    assert_close(sparse[1], dense[1], 2e-6, "grad")


@pytest.mark.gpu_core
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence,beta", divergences(("forward_kl", None), ("jsd", 0.5)))
@pytest.mark.parametrize("shape,dim", [((2, 5, 41), -1), ((2, 12, 3, 2), 1)], ids=str)
def test_topk_matches_reference(device, backend, dtype, divergence, beta, shape, dim):
    s = make(shape, dtype, device, "permuted", seed=21)
    t = make(shape, torch.float32, device, seed=22)
    topk = kdfast.topk_logits(t, 4, dim=dim, dtype=torch.bfloat16)
    rows = s.shape[:dim % s.dim()] + s.shape[dim % s.dim() + 1:]
    target = torch.randint(0, 4, rows, generator=torch.Generator().manual_seed(1)).to(device)
    target.view(-1)[1] = -100
    grad_out = torch.tensor(0.6, device=device)
    fn = loss_fn(divergence, beta)
    for tail in ("bucket", "renormalize"):
        kw = dict(dim=dim, target=target, tail=tail, T=1.0 if tail == "bucket" else 2.0)
        loss, grad = run(backend, fn, s, topk, grad_out, **kw)
        ref_loss, ref_grad = reference(fn, s, topk, grad_out, **kw)
        assert grad.dtype == dtype and grad.shape == s.shape
        assert_close(loss, ref_loss, max(LOSS_TOLERANCE[dtype], 1e-5 if dtype != torch.float64 else 0), "loss")
        assert_close(grad, ref_grad, max(TOLERANCE[dtype], 1e-5 if dtype != torch.float64 else 0), "grad")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_topk_int64_indices_and_extreme_student(device, backend):
    s, t = make((5, 60), device=device, seed=23), make((5, 60), device=device, seed=24)
    topk = kdfast.topk_logits(t, 8)
    topk = kdfast.TopK(topk.indices.long(), topk.logprobs)
    s[0, :] = s[0, :] + 1e4
    s[1, topk.indices[1, 0]] = 1e4  # all of the student's mass on one top-k class
    s[2, :30] = float("-inf")
    s[2, topk.indices[2]] = 0.0  # the student's classes outside the top-k: some ruled out
    grad_out = torch.tensor(1.0, device=device)
    for fn in (KF.soft_target_kl, KF.jsd, KF.tvd):
        loss, grad = run(backend, fn, s, topk, grad_out, reduction="none")
        ref_loss, ref_grad = reference(fn, s, topk, grad_out, reduction="none")
        assert_close(loss, ref_loss, 1e-5, "loss")
        assert_close(grad, ref_grad, 1e-5, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_topk_cpu_rows_in_sequence(dtype):
    """The CPU kernel sweeps row r + 1 while it writes row r's gradient: every kind of row
    after every other (ignored, swept again around a maximum far above K's, a tail that
    underflows, ordinary), rows not 64-byte aligned (V odd), a gradient large enough for
    non-temporal stores, one and two threads; k = 16 + 3: top-k classes in whole vectors and
    one by one."""
    N, V, k = 24, 20001, 19
    s = make((N, V), torch.float32, seed=31)
    t = make((N, V), torch.float32, seed=32)
    topk = kdfast.topk_logits(t, k, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    idx = topk.indices.long()
    target = torch.zeros(N, dtype=torch.long)
    target[[1, 2, 9, 23]] = -100  # ignored: two in a row, one between special rows, the last
    for r in (3, 4, 10):  # a class outside K 100 above K's maximum: the sweep is done again
        outside = next(j for j in range(V) if j not in set(idx[r].tolist()))
        s[r, outside] = s[r, idx[r]].max() + 100
    for r in (5, 11):  # the tail's mass underflows next to K's
        s[r] -= 200
        s[r, idx[r]] += 200
    s = s.to(dtype)
    grad_out = torch.tensor(0.7)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for fn in (KF.soft_target_kl, KF.jsd, KF.reverse_kl):
                loss, grad = run("cpu", fn, s, topk, grad_out, target=target, reduction="none")
                ref_loss, ref_grad = reference(fn, s, topk, grad_out, target=target, reduction="none")
                tol = {torch.float32: 1e-5, torch.float64: 1e-10}.get(dtype, TOLERANCE[dtype])
                assert_close(loss, ref_loss, tol, f"{fn.__name__} loss, {n_threads} threads")
                assert_close(grad, ref_grad, tol, f"{fn.__name__} grad, {n_threads} threads")
    finally:
        torch.set_num_threads(threads)


# (Triton: its gradients against the float64 reference's in test_topk_matches_explicit_distributions)
@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "triton"])
def test_topk_gradcheck(device, backend):
    s = make((3, 6), torch.float64, device, seed=25).requires_grad_()
    topk = kdfast.topk_logits(make((3, 6), torch.float64, device, seed=26), 2, dtype=torch.float64)
    target = torch.tensor([1, -100, 0], device=device)

    def f(x):
        with kdfast.use_backend(backend):
            return (KF.soft_target_kl(x, topk, target=target), KF.jsd(x, topk, beta=0.3, reduction="none"),
                    KF.reverse_kl(x, topk, tail="renormalize", T=2.0), KF.tvd(x, topk, tail="renormalize"))

    assert torch.autograd.gradcheck(f, (s,))


def test_topk_reference_gives_bad_rows_nan():
    """What GPU kernels do for indices they cannot check without a host sync (the CPU raises)."""
    s = make((3, 10))
    indices = torch.tensor([[1, 2, 3], [4, 4, 5], [0, 10, 1]])
    logprobs = torch.full((3, 3), -2.0)
    rows = op.topk_divergence_ref(s, indices, logprobs)
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1]) and torch.isnan(rows[2])


def test_topk_logits_matches_log_softmax_topk():
    t = make((3, 7, 50), seed=27)
    full = torch.log_softmax(t, -1).topk(6, -1)
    for chunk_rows in (None, 4, 1):
        topk = kdfast.topk_logits(t, 6, chunk_rows=chunk_rows)
        assert topk.indices.dtype == torch.int32 and topk.logprobs.dtype == torch.float32
        assert torch.equal(topk.indices.long(), full.indices) and torch.equal(topk.logprobs, full.values)
    seg = make((2, 12, 3, 5), seed=28).transpose(2, 3)  # [B, C, W, H], class dim 1, not contiguous
    topk = kdfast.topk_logits(seg, 3, dim=1, chunk_rows=2, dtype=torch.bfloat16)
    full = torch.log_softmax(seg, 1).topk(3, 1)
    assert topk.indices.shape == (2, 3, 5, 3) and topk.logprobs.dtype == torch.bfloat16
    assert torch.equal(topk.indices.long(), full.indices)
    assert torch.equal(topk.logprobs, full.values.bfloat16())


def test_topk_logits_memory_is_one_chunk():
    t = make((64, 1000), seed=29)
    with NewTensorSpy(min_numel=8 * 1000 + 1) as spy:
        kdfast.topk_logits(t, 10, chunk_rows=8)
    assert spy.created == []


# ---------------------------------------------------------------------------------------
# Ops: opcheck and torch.compile


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "torch"])
def test_opcheck(device, backend):
    s = make((6, 35), device=device, seed=30).requires_grad_()
    t = make((6, 35), device=device, seed=31)
    target = torch.tensor([0, 3, -100, 34, 7, 7], device=device)
    for divergence in ("reverse_kl", "jsd", "tvd"):
        for reduction in ("batchmean", "none"):
            args = (s, t, target, 1, 3.0, -100, divergence, 0.3, False, 1.0, 8.0, reduction, 1.0, None, True,
                    backend)
            torch.library.opcheck(torch.ops.kdfast.softmax_kl.default, args)


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "torch"])
def test_topk_opcheck(device, backend):
    s = make((2, 3, 35), device=device, seed=32).requires_grad_()
    topk = kdfast.topk_logits(make((2, 3, 35), device=device, seed=33), 5)
    target = torch.tensor([[0, -100, 1], [2, 2, 2]], device=device)
    for divergence, renormalize in (("forward_kl", False), ("jsd", False), ("tvd", True), ("reverse_kl", True)):
        args = (s, topk.indices, topk.logprobs, target, 2, 1.0, -100, divergence, 0.5, renormalize, "mean", 1.0,
                None, True, backend)
        torch.library.opcheck(torch.ops.kdfast.softmax_kl_topk.default, args)


def _every_loss(s, t, indices, logprobs, target):
    sparse = kdfast.TopK(indices, logprobs)
    return (KF.reverse_kl(s, t, T=2.0) + 0.5 * KF.jsd(s, t, beta=0.3, target=target)
            + KF.tvd(s, sparse, T=2.0, tail="renormalize"))


def _compile_inputs(device):
    s = make((8, 50), device=device, seed=34).requires_grad_()
    t = make((8, 50), device=device, seed=35)
    topk = kdfast.topk_logits(t, 5)
    target = torch.arange(8, device=device)
    target[3] = -100
    return s, [t, topk.indices, topk.logprobs, target]


@pytest.mark.compile
@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "torch"])
def test_torch_compile_fullgraph(device, backend):
    s, others = _compile_inputs(device)
    assert_compiled_matches_eager(_every_loss, [s], others, backend)


@pytest.mark.compile
def test_functional_traces_without_graph_breaks():
    """The checks (TopK's included) and the torch backend under torch.compile(fullgraph=True);
    dynamo's eager backend: the trace is what is tested, not inductor's code."""
    s, others = _compile_inputs("cpu")
    torch._dynamo.reset()
    with kdfast.use_backend("torch"):
        eager = _every_loss(s, *others)
        compiled = torch.compile(_every_loss, fullgraph=True, backend="eager")(s, *others)
    assert_close(compiled, eager, 1e-6, "loss")


GPU_BACKENDS = kernel_backends("cuda", op.KERNELS) if torch.cuda.is_available() else []


@pytest.mark.gpu
@pytest.mark.gpu_core
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("V", [32000, 128256])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_gpu_sizes(backend, dtype, V, divergence, beta):
    """LLM vocabularies: rows cached in one block or split over a cluster (CUDA), tiles (Triton)."""
    s, t = make((6, V), dtype, "cuda", seed=40), make((6, V), dtype, "cuda", seed=41)
    target = torch.tensor([0, V - 1, 17, -100, 5, V // 2], device="cuda")
    grad_out = torch.tensor(1.3, device="cuda")
    fn = loss_fn(divergence, beta)
    loss, grad = run(backend, fn, s, t, grad_out, T=2.0, target=target)
    ref_loss, ref_grad = reference(fn, s, t, grad_out, T=2.0, target=target)
    assert_close(loss, ref_loss, 2e-5, "loss")
    assert_close(grad, ref_grad, max(TOLERANCE[dtype], 1e-5), "grad")


@pytest.mark.gpu
@pytest.mark.gpu_core
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", kernel_backends("cuda", op.KERNELS) if torch.cuda.is_available() else [])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_gpu_topk_sizes(backend, tail):
    """k = 64 of V = 128256, bfloat16 student and log-probabilities."""
    s, t = make((8, 128256), torch.bfloat16, "cuda", seed=42), make((8, 128256), torch.float32, "cuda", seed=43)
    topk = kdfast.topk_logits(t, 64, dtype=torch.bfloat16)
    grad_out = torch.tensor(1.0, device="cuda")
    for fn in (KF.soft_target_kl, KF.reverse_kl, KF.jsd, KF.tvd):
        loss, grad = run(backend, fn, s, topk, grad_out, tail=tail)
        ref_loss, ref_grad = reference(fn, s, topk, grad_out, tail=tail)
        assert_close(loss, ref_loss, 2e-5, "loss")
        assert_close(grad, ref_grad, TOLERANCE[torch.bfloat16], "grad")


@pytest.mark.parametrize("backend", ["torch"] + [b for b in kernel_backends("cpu", op.KERNELS) if b == "cpu"])
def test_bad_indices_are_caught_on_the_cpu(backend):
    """The CPU backends check the indices as they read them (the GPU ones give the row NaN)."""
    s = make((3, 10))
    logprobs = torch.full((3, 3), -2.0)
    repeated = kdfast.TopK(torch.tensor([[1, 2, 3], [4, 4, 5], [0, 9, 1]]), logprobs)
    outside = kdfast.TopK(torch.tensor([[1, 2, 3], [4, 6, 5], [0, 10, 1]]), logprobs)
    with kdfast.use_backend(backend):
        with pytest.raises(ValueError, match=r"jsd: teacher_logits.indices repeats class 4 in row 1"):
            KF.jsd(s, repeated)
        with pytest.raises(ValueError, match=r"tvd: teacher_logits.indices holds class index 10 outside \[0, 10\)"):
            KF.tvd(s, outside, tail="renormalize")
        # the next call with good indices is unaffected (the kernel's per-thread marks were cleared)
        good = kdfast.TopK(repeated.indices[[0, 2]], logprobs[:2])
        assert torch.isfinite(KF.jsd(s[[0, 2]], good, reduction="none")).all()


def test_the_benchmarks_eager_formulas_are_these_losses():
    """kdfast/bench/peers.py's reverse KL and TVD compute what kdfast computes (a speed-up is always
    measured against the same loss; JSD's peer is TRL's function: tests/test_trl.py)."""
    from kdfast.bench.peers import eager_reverse_kl, eager_tvd
    s, t = make((6, 40), torch.float64, seed=50), make((6, 40), torch.float64, seed=51)
    with kdfast.use_backend("torch"):
        assert_close(eager_reverse_kl(s, t, 2.0), KF.reverse_kl(s, t, T=2.0), 1e-12, "reverse_kl")
        assert_close(eager_tvd(s, t, 2.0), KF.tvd(s, t, T=2.0), 1e-12, "tvd")
