"""kdfast.functional.fused_linear_kd (kdfast/ops/fused_linear.py) against its definition,
fused_linear_kd_ref (the logits materialised, kdfast's reference divergences and
F.cross_entropy), in float64: every divergence x teacher form x backend, dtypes, chunk
boundaries, ignored tokens, [B, S, H] input, gradients of the student's hidden states,
weight and bias; no [N, V] tensor allocated; torch.compile; TRL's _chunked_divergence_loss.
"""
import math

import pytest
import torch

import kdfast
from kdfast import functional as KF
from kdfast.ops import fused_linear as op
from helpers import (LOSS_TOLERANCE, TOLERANCE, assert_close, assert_compiled_matches_eager, backend_params,
                     kernel_backends)

N, H, HT, V = 37, 16, 24, 101  # odd N and V; the teacher wider than the student
CHUNK = 10  # does not divide N
BACKENDS = ["torch"] + kernel_backends("cpu", op.KERNELS)
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("tvd", 0.5)]
TEACHERS = ["hidden", "hidden+bias", "logits", "topk-bucket", "topk-renormalize"]
K = 7


def make(dtype=torch.float64, seed=0, n=N, v=V, bias=True, ignored=True):
    """Student (h, w, b) with gradients, teacher parts, target with some ignored tokens."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    h, w = randn(n, H).requires_grad_(), randn(v, H, scale=0.7).requires_grad_()
    b = randn(v).requires_grad_() if bias else None
    teacher = {"hidden": randn(n, HT), "weight": randn(v, HT, scale=0.6), "bias": randn(v),
               "logits": randn(n, v, scale=3.0)}
    target = torch.randint(0, v, (n,), generator=g)
    if ignored:
        target[::4] = -100
    return h, w, b, teacher, target


def teacher_form(teacher, form):
    if form == "hidden":
        return (teacher["hidden"], teacher["weight"])
    if form == "hidden+bias":
        return (teacher["hidden"], teacher["weight"], teacher["bias"])
    if form == "logits":
        return teacher["logits"]
    return kdfast.topk_logits(teacher["logits"], K)


def teacher_args(teacher, n_rows=None):
    """The reference's six teacher arguments for a teacher given as to fused_linear_kd."""
    if isinstance(teacher, kdfast.TopK):
        k = teacher.indices.shape[-1]
        return None, None, None, None, teacher.indices.reshape(-1, k), teacher.logprobs.reshape(-1, k)
    if isinstance(teacher, torch.Tensor):
        return None, None, None, teacher.reshape(-1, teacher.shape[-1]), None, None
    hidden, weight, bias = (*teacher, None)[:3]
    return hidden.reshape(-1, hidden.shape[-1]), weight, bias, None, None, None


def reference(h, w, b, teacher, target=None, divergence="forward_kl", beta=0.5, T=1.0, soft_weight=1.0,
              hard_weight=0.0, ignore_index=-100, reduction="mean", tail="bucket"):
    """fused_linear_kd_ref in float64 (inputs upcast): (loss, kd, ce) and the gradients of
    h, w, b."""
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    args = [None if x is None else (x.double() if x.is_floating_point() else x) for x in teacher_args(teacher)]
    if args[5] is not None:
        args[5] = teacher.logprobs.reshape(args[4].shape).double()
    if divergence == "jsd" and beta in (0, 1):
        divergence = "forward_kl" if beta == 0 else "reverse_kl"
    loss, kd, ce = op.fused_linear_kd_ref(h64.reshape(-1, h.shape[-1]), w64, b64, *args,
                                          None if target is None else target.reshape(-1), divergence, beta, T,
                                          soft_weight, hard_weight, ignore_index, tail, reduction)
    inputs = [x for x in (h64, w64, b64) if x is not None]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True) if loss.requires_grad else [None] * len(inputs)
    return (loss.detach(), kd.detach(), ce.detach()), [torch.zeros_like(x) if g is None else g
                                                       for x, g in zip(inputs, grads)]


def run(backend, h, w, b, teacher, grad_output=1.0, **kw):
    with kdfast.use_backend(backend):
        loss, kd, ce = KF.fused_linear_kd(h, w, teacher, student_bias=b, return_parts=True, **kw)
    inputs = [x for x in (h, w, b) if x is not None]
    grads = torch.autograd.grad(loss * grad_output, inputs)
    return (loss.detach(), kd, ce), [g / grad_output for g in grads]


def check(got, expected, dtype, what=""):
    (loss, kd, ce), grads = got
    (loss_r, kd_r, ce_r), grads_r = expected
    for name, a, e in (("loss", loss, loss_r), ("kd", kd, kd_r), ("ce", ce, ce_r)):
        assert_close(a, e, LOSS_TOLERANCE[dtype], f"{what} {name}", floor=1e-12)
    for name, a, e in zip(("grad h", "grad w", "grad b"), grads, grads_r):
        assert a.dtype == dtype, f"{name} has dtype {a.dtype}, not the input's {dtype}"
        assert_close(a, e, GRAD_TOLERANCE[dtype], f"{what} {name}")


# Gradients: TOLERANCE is per element of a row kernel's output; here each gradient is also a
# sum of products over the V classes (grad_h) or the N tokens (grad_w) in float32.
GRAD_TOLERANCE = {**TOLERANCE, torch.float32: 2e-5}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", TEACHERS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_matches_reference(backend, form, divergence, beta):
    if backend == "triton" and form not in ("hidden+bias", "topk-bucket"):
        pytest.skip("interpreted Triton: two teacher forms cover its two kernels")
    h, w, b, teacher, target = make()
    teacher = teacher_form(teacher, form)
    tail = form.split("-")[1] if form.startswith("topk") else "bucket"
    T = 1.0 if tail == "bucket" and form.startswith("topk") else 2.0
    kw = dict(target=target, divergence=divergence, beta=beta, T=T, soft_weight=0.7, hard_weight=0.4, tail=tail)
    got = run(backend, h, w, b, teacher, grad_output=1.7, chunk_size=CHUNK, **kw)
    check(got, reference(h, w, b, teacher, **kw), torch.float64, f"{backend} {form} {divergence}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["hidden+bias", "logits", "topk-bucket"])
def test_dtypes(dtype, form):
    """Low-precision inputs: logits, divergence and grad_w accumulated in float32; the
    gradients come back in the inputs' dtypes."""
    h, w, b, teacher, target = make(dtype)
    teacher = teacher_form(teacher, form)
    kw = dict(target=target, divergence="jsd", beta=0.5, soft_weight=1.0, hard_weight=0.5)
    got = run("cpu", h, w, b, teacher, chunk_size=CHUNK, **kw)
    assert got[0][0].dtype == torch.float32
    check(got, reference(h, w, b, teacher, **kw), dtype, f"{dtype} {form}")


@pytest.mark.parametrize("chunk_size", [1, 7, N - 1, N, N + 5, None])
def test_chunk_boundaries(chunk_size):
    h, w, b, teacher, target = make()
    teacher = teacher_form(teacher, "hidden")
    kw = dict(target=target, divergence="reverse_kl", T=3.0, hard_weight=0.25)
    check(run("cpu", h, w, b, teacher, chunk_size=chunk_size, **kw), reference(h, w, b, teacher, **kw),
          torch.float64, f"chunk_size={chunk_size}")


def test_batch_sequence_input():
    """[B, S, H] hidden states with [B, S] targets and teachers of the same leading dims:
    the same as the rows flattened."""
    h, w, b, teacher, target = make(n=36)
    for form in ("hidden+bias", "logits", "topk-renormalize"):
        t = teacher_form(teacher, form)
        t3 = kdfast.TopK(*(x.reshape(4, 9, -1) for x in t)) if isinstance(t, kdfast.TopK) else \
            t.reshape(4, 9, -1) if isinstance(t, torch.Tensor) else (t[0].reshape(4, 9, -1), *t[1:])
        kw = dict(divergence="jsd", beta=0.5, T=2.0, hard_weight=1.0, tail="renormalize", chunk_size=5)
        h3 = h.detach().reshape(4, 9, H).requires_grad_()
        (loss3, *_), (gh3, *rest3) = run("cpu", h3, w, b, t3, target=target.reshape(4, 9).int(), **kw)
        (loss, *_), (gh, *rest) = run("cpu", h, w, b, t, target=target, **kw)
        assert gh3.shape == (4, 9, H)
        assert_close(loss3, loss, 1e-12, f"{form} loss")
        for a, e in zip([gh3.reshape(36, H), *rest3], [gh, *rest]):
            assert_close(a, e, 1e-12, f"{form} grad")


def test_no_target_and_sum():
    """Without a target every token counts; 'sum' does not divide."""
    h, w, b, teacher, _ = make()
    teacher = teacher_form(teacher, "hidden")
    for reduction in ("mean", "sum"):
        kw = dict(divergence="tvd", T=1.5, reduction=reduction)
        check(run("cpu", h, w, b, teacher, chunk_size=CHUNK, **kw), reference(h, w, b, teacher, **kw),
              torch.float64, reduction)
    mean = KF.fused_linear_kd(h, w, teacher, divergence="tvd", student_bias=b)
    total = KF.fused_linear_kd(h, w, teacher, divergence="tvd", student_bias=b, reduction="sum")
    assert_close(total, mean * N, 1e-12, "sum = N x mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tokens_ignored(backend):
    h, w, b, teacher, target = make()
    target[:] = -100
    (loss, kd, ce), grads = run(backend, h, w, b, teacher_form(teacher, "hidden"), target=target,
                                divergence="jsd", hard_weight=1.0, chunk_size=CHUNK)
    assert float(loss) == 0 and float(kd) == 0 and float(ce) == 0
    assert all(bool((g == 0).all()) for g in grads)


def test_ignored_tokens_do_not_count():
    """The loss and gradients equal those of the kept tokens alone (mean over them)."""
    h, w, b, teacher, target = make()
    kept = target != -100
    t = teacher_form(teacher, "hidden+bias")
    kw = dict(divergence="forward_kl", T=2.0, hard_weight=0.5, chunk_size=CHUNK)
    (loss, *_), (gh, gw, gb) = run("cpu", h, w, b, t, target=target, **kw)
    h_kept = h.detach()[kept].requires_grad_()
    (loss_k, *_), (gh_k, gw_k, gb_k) = run("cpu", h_kept, w, b, (t[0][kept], *t[1:]), target=target[kept], **kw)
    assert_close(loss, loss_k, 1e-12, "loss")
    assert_close(gh[kept], gh_k, 1e-12, "grad h")
    assert bool((gh[~kept] == 0).all())
    assert_close(gw, gw_k, 1e-12, "grad w")
    assert_close(gb, gb_k, 1e-12, "grad b")


def test_return_parts_and_weights():
    """loss = soft_weight·kd + hard_weight·ce; a term of weight 0 is still reported; the
    parts are detached."""
    h, w, b, teacher, target = make()
    t = teacher_form(teacher, "logits")
    loss, kd, ce = KF.fused_linear_kd(h, w, t, target=target, soft_weight=0.3, hard_weight=2.0, student_bias=b,
                                      chunk_size=CHUNK, return_parts=True)
    assert_close(loss, 0.3 * kd + 2.0 * ce, 1e-12, "loss from its parts")
    assert not kd.requires_grad and not ce.requires_grad and loss.requires_grad
    for soft, hard in ((0.0, 1.0), (1.0, 0.0)):
        kw = dict(target=target, soft_weight=soft, hard_weight=hard)
        got = run("cpu", h, w, b, t, chunk_size=CHUNK, **kw)
        check(got, reference(h, w, b, t, **kw), torch.float64, f"weights {soft}, {hard}")
        assert float(got[0][1]) > 0 and float(got[0][2]) > 0
    loss = KF.fused_linear_kd(h, w, t, target=target, soft_weight=0.0, hard_weight=0.0)
    assert float(loss.detach()) == 0
    assert all(bool((g == 0).all()) for g in torch.autograd.grad(loss, (h, w)))


def test_teacher_gets_no_gradient():
    h, w, b, teacher, target = make()
    th, tw, tb = (teacher[k].requires_grad_() for k in ("hidden", "weight", "bias"))
    loss = KF.fused_linear_kd(h, w, (th, tw, tb), target=target, student_bias=b)
    loss.backward()
    assert th.grad is None and tw.grad is None and tb.grad is None
    assert h.grad is not None and w.grad is not None and b.grad is not None
    logits = teacher["logits"].requires_grad_()
    KF.fused_linear_kd(h, w, logits).backward()
    assert logits.grad is None


def test_without_gradient():
    """No gradient wanted (no_grad, or inputs without requires_grad): the loss only."""
    h, w, b, teacher, target = make()
    t = teacher_form(teacher, "hidden")
    expected = reference(h, w, b, t, target=target, hard_weight=0.5)[0][0]
    with torch.no_grad():
        loss = KF.fused_linear_kd(h, w, t, target=target, hard_weight=0.5, student_bias=b, chunk_size=CHUNK)
    assert not loss.requires_grad
    assert_close(loss, expected, 1e-12, "no_grad")
    loss = KF.fused_linear_kd(h.detach(), w.detach(), t, target=target, hard_weight=0.5, student_bias=b.detach())
    assert_close(loss, expected, 1e-12, "detached inputs")


def test_only_some_inputs_need_grad():
    """A frozen head (weight without requires_grad): the hidden states' gradient alone."""
    h, w, b, teacher, target = make(bias=False)
    w = w.detach()
    t = teacher_form(teacher, "hidden")
    loss = KF.fused_linear_kd(h, w, t, target=target, chunk_size=CHUNK)
    (gh,) = torch.autograd.grad(loss, (h,))
    assert_close(gh, reference(h, w, None, t, target=target)[1][0], 1e-12, "grad h")


def test_retain_graph_backward_twice():
    h, w, b, teacher, target = make()
    loss = KF.fused_linear_kd(h, w, teacher_form(teacher, "hidden"), target=target, student_bias=b)
    first = torch.autograd.grad(loss * 2, (h, w, b), retain_graph=True)
    second = torch.autograd.grad(loss, (h, w, b))
    for a, e in zip(first, second):
        assert_close(a, 2 * e, 1e-12, "second backward")


def test_jsd_beta_ends_are_the_kls():
    h, w, b, teacher, target = make()
    t = teacher_form(teacher, "hidden")
    for beta, divergence in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        a = KF.fused_linear_kd(h, w, t, target=target, divergence="jsd", beta=beta)
        e = KF.fused_linear_kd(h, w, t, target=target, divergence=divergence)
        assert_close(a, e, 0, f"beta={beta}")


def test_default_chunk_size_rule():
    cpu = torch.device("cpu")
    assert op.default_chunk_size(2048, 32000, cpu) == 256  # 32 MiB of float32 rows, a multiple of 16
    assert op.default_chunk_size(100, 32000, cpu) == 100  # at most N
    assert op.default_chunk_size(10**6, 10**7, cpu) == 16  # at least one multiple
    assert op.default_chunk_size(5000, 1000, cpu) == 5000  # whole small problems in one chunk


GPU_PARAMS = [p for p in backend_params(op.KERNELS) if p.values[0] == "cuda"] or [
    pytest.param("cuda", "cuda", marks=[pytest.mark.gpu, pytest.mark.skip(reason="no CUDA GPU")])]
# On a GPU, bfloat16 / float16 heads run their matmuls in that dtype (float32 outputs): the
# gradient g is rounded to it for the two gradient matmuls, on top of the output's rounding.
GPU_GRAD_TOLERANCE = {**GRAD_TOLERANCE, torch.bfloat16: 2 * TOLERANCE[torch.bfloat16]}


@pytest.mark.gpu_core
@pytest.mark.parametrize("device,backend", GPU_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["hidden+bias", "logits", "topk-bucket"])
def test_gpu_matches_reference(device, backend, dtype, form):
    """The GPU path (cuBLAS matmuls, out_dtype for bfloat16, the CUDA / Triton divergence
    kernels) on several chunks, against the float64 reference on the CPU."""
    h, w, b, teacher, target = make(dtype, n=300, v=5003)
    t = teacher_form(teacher, form)
    kw = dict(target=target, divergence="jsd", beta=0.5, soft_weight=1.0, hard_weight=0.5)
    expected = reference(h, w, b, t, **kw)

    def cuda(x):
        return x.detach().to(device).requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x

    t_gpu = kdfast.TopK(*map(cuda, t)) if isinstance(t, kdfast.TopK) else cuda(t) if isinstance(t, torch.Tensor) \
        else tuple(map(cuda, t))
    kw["target"] = cuda(target)
    (loss, kd, ce), grads = run(backend, cuda(h), cuda(w), cuda(b), t_gpu, chunk_size=128, **kw)
    for name, a, e in (("loss", loss, expected[0][0]), ("kd", kd, expected[0][1]), ("ce", ce, expected[0][2])):
        assert_close(a.cpu(), e, LOSS_TOLERANCE[dtype], name, floor=1e-12)
    for name, a, e in zip(("grad h", "grad w", "grad b"), grads, expected[1]):
        assert a.dtype == dtype
        assert_close(a.cpu(), e, GPU_GRAD_TOLERANCE[dtype], name)


def _allocations(fn):
    """(largest single CPU allocation, peak of live bytes allocated) during fn(), from the
    profiler's record of every allocation of the CPU allocator (C++ kernels included)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    current = peak = largest = 0
    for _, nbytes in events:
        current += nbytes
        peak, largest = max(peak, current), max(largest, nbytes)
    return largest, peak


@pytest.mark.parametrize("form", ["hidden", "logits", "topk-bucket"])
def test_no_logits_tensor_is_allocated(form):
    """Neither forward nor backward allocates an [N, V] tensor: every allocation is at most
    a chunk's tile or the [V, H] weight gradient, and the peak is a few tiles. The same
    recording of the materialised path sees its [N, V] logits (the check can fail)."""
    n, v, chunk = 512, 1000, 32
    h, w, b, teacher, target = make(torch.float32, n=n, v=v)
    t = teacher_form(teacher, form)
    logits_bytes, tile_bytes, weight_bytes = n * v * 4, chunk * v * 4, v * H * 4

    def fused():
        loss = KF.fused_linear_kd(h, w, t, target=target, divergence="jsd", hard_weight=0.5, student_bias=b,
                                  chunk_size=chunk)
        loss.backward()

    fused()  # first call: lazy initialisations
    largest, peak = _allocations(fused)
    assert largest <= max(tile_bytes, weight_bytes), f"an allocation of {largest} B (tile {tile_bytes} B)"
    assert peak <= 6 * tile_bytes + 2 * weight_bytes + 4 * n * H * 4, f"peak {peak} B vs logits {logits_bytes} B"

    def materialised():
        reference(h, w, b, t, target=target, divergence="jsd", hard_weight=0.5)

    largest_ref, peak_ref = _allocations(materialised)
    assert largest_ref >= logits_bytes  # fp64 logits here: the recording sees them


@pytest.mark.compile
def test_torch_compile():
    h, w, b, teacher, target = make(torch.float32, n=24, v=40, ignored=True)
    th, tw = teacher["hidden"][:24], teacher["weight"][:40]

    def loss_fn(h, w, b, th, tw, target):
        return KF.fused_linear_kd(h, w, (th, tw), target=target, divergence="jsd", hard_weight=0.5, student_bias=b,
                                  chunk_size=10)

    assert_compiled_matches_eager(loss_fn, [h, w, b], [th, tw, target], "cpu", tol=1e-6)


def test_opcheck():
    h, w, b, teacher, target = make(n=12, v=20)
    th, tw = teacher["hidden"][:12], teacher["weight"][:20]
    args = (h, w, b, th, tw, None, None, None, None, target[:12], "jsd", 0.5, 1.0, 1.0, 0.5, -100, False, "mean", 5,
            False, True, "cpu")
    torch.library.opcheck(torch.ops.kdfast.fused_linear_kd.default, args)


# ---------------------------------------------------------------------------------------
# TRL 1.16's DistillationTrainer loss: JSD(beta) with beta = 0 forward KL and 1 reverse KL,
# temperature without T² (kdfast's loss is T² times TRL's), completion_mask = target !=
# ignore_index, mean over the kept tokens (num_items_in_batch=None); its gradients flow to
# the student's hidden states, weight and bias.

def _trl_chunked():
    pytest.importorskip("transformers")
    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    except ImportError as e:
        pytest.skip(f"trl's _chunked_divergence_loss is not importable: {e}")
    return _chunked_divergence_loss


@pytest.mark.parametrize("beta,T", [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (0.3, 2.0)])
def test_matches_trl_chunked_divergence_loss(beta, T):
    trl_loss = _trl_chunked()
    h, w, b, teacher, target = make(torch.float32, n=36)
    th, tw, tb = teacher["hidden"][:36], teacher["weight"], teacher["bias"]
    mask = (target != -100).reshape(4, 9)
    ours = KF.fused_linear_kd(h.reshape(4, 9, H), w, (th.reshape(4, 9, HT), tw, tb), target=target.reshape(4, 9),
                              divergence="jsd", beta=beta, T=T, student_bias=b, chunk_size=8)
    g_ours = torch.autograd.grad(ours, (h, w, b))
    theirs = trl_loss(h.reshape(4, 9, H), th.reshape(4, 9, HT), w, tw, mask.long(), beta,
                      student_lm_head_bias=b, teacher_lm_head_bias=tb, temperature=T)[0]
    g_theirs = torch.autograd.grad(theirs, (h, w, b))
    assert_close(ours, theirs * T * T, 1e-5, "loss")
    for name, a, e in zip(("h", "w", "b"), g_ours, g_theirs):
        assert_close(a, e * T * T, 1e-4, f"grad {name}")


# ---------------------------------------------------------------------------------------
# Bad input

def _call(**overrides):
    h, w, b, teacher, target = make(n=8, v=11)
    kw = dict(student_hidden=h, student_weight=w, teacher=(teacher["hidden"][:8], teacher["weight"][:11]),
              target=target[:8])
    kw.update(overrides)
    return KF.fused_linear_kd(**kw)


@pytest.mark.parametrize("overrides,match", [
    (dict(student_hidden=torch.randn(8)), r"student_hidden has shape \[8\]"),
    (dict(student_hidden=torch.ones(8, H, dtype=torch.long)), "student_hidden has dtype torch.int64"),
    (dict(student_weight=torch.randn(11, H + 1)), "width 16 .* the weight's second dim"),
    (dict(student_weight=torch.randn(H, 11)), "width 16 .*not its transpose"),
    (dict(student_bias=torch.randn(12)), r"student_bias has shape \[12\]"),
    (dict(teacher=(torch.randn(8, HT), torch.randn(12, HT))), "teacher's head has 12 classes"),
    (dict(teacher=(torch.randn(9, HT), torch.randn(11, HT))), "9 rows .* same tokens"),
    (dict(teacher=(torch.randn(8, HT), torch.randn(11, HT + 1))), r"teacher\[0\] \(hidden states\) has width"),
    (dict(teacher=torch.randn(8, 12)), r"teacher logits have shape \[8, 12\]"),
    (dict(teacher=[torch.randn(8, HT)]), "teacher must be .* got list of length 1"),
    (dict(teacher=kdfast.TopK(torch.zeros(8, 3, dtype=torch.long), torch.zeros(8, 3)), T=2.0), "tail='bucket'"),
    (dict(teacher=kdfast.TopK(torch.zeros(8, 3, dtype=torch.long), torch.full((8, 3), -1.0))), "repeats class 0"),
    (dict(divergence="kl"), "unknown divergence 'kl'"),
    (dict(beta=1.5), "beta must be a number in"),
    (dict(T=0), "temperature T must be"),
    (dict(soft_weight=-1), "soft_weight must be a finite number >= 0"),
    (dict(hard_weight=float("nan")), "hard_weight must be a finite number >= 0"),
    (dict(hard_weight=1.0, target=None), "hard_weight=1 needs target"),
    (dict(reduction="none"), "reduction='none'"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(target=torch.full((8,), 11)), "class index 11 outside"),
    (dict(target=torch.zeros(7, dtype=torch.long)), "target has shape"),
    (dict(target=torch.zeros(8)), "target must hold integer class indices"),
])
def test_errors(overrides, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _call(**overrides)


def test_error_names_the_function():
    with pytest.raises(ValueError, match="^fused_linear_kd: "):
        _call(divergence="kl")


def test_no_nan_when_logits_are_extreme():
    """Large logits (|z| ~ 1e4) are centred on the row maxima: finite loss and gradients."""
    h, w, b, teacher, target = make(torch.float32)
    h = (h.detach() * 300).requires_grad_()
    loss = KF.fused_linear_kd(h, w, teacher_form(teacher, "hidden"), target=target, hard_weight=1.0,
                              divergence="jsd")
    grads = torch.autograd.grad(loss, (h, w))
    assert math.isfinite(float(loss.detach())) and all(bool(torch.isfinite(g).all()) for g in grads)


def test_bench_declares_the_issue_floors():
    """kdfast bench fused_linear: the CPU cases (N = 2048, V = 32000, H = 256, float32) hold
    the floors against the eager path and the peers; the GPU case (bfloat16, N = 16384,
    V = 128256, H = 4096) is declared without a GPU; a quick case's providers agree."""
    from kdfast.bench import fused_linear as bench

    cpu = bench.cases("cpu", False)
    assert [(c.op, c.shape, c.dtype) for c in cpu] == [
        ("fused_linear jsd", {"N": 2048, "V": 32000, "H": 256}, torch.float32),
        ("fused_linear forward_kl", {"N": 2048, "V": 32000, "H": 256}, torch.float32)]
    for case in cpu:
        floors = {(f.baseline, f.speedup) for f in case.floors if f.provider == "kdfast-cpu"}
        memory = {(m.baseline, m.fraction) for m in case.memory_ratios if m.provider == "kdfast-cpu"}
        assert ("eager", 1.0) in floors and ("eager", 0.10) in memory
        for peer in ("trl-chunked", "liger", "liger-compiled"):
            assert (peer in case.providers) == ((peer, 1.2) in floors) == ((peer, 1.0) in memory)
    gpu = bench.cases("cuda", False)
    assert gpu[0].shape == {"N": 16384, "V": 128256, "H": 4096} and gpu[0].dtype == torch.bfloat16
    assert {f.baseline for f in gpu[0].floors} >= {"eager"}
    quick = bench.cases("cpu", True)[0]
    outputs = [quick.providers[name]()() for name in ("eager", "kdfast-cpu")]
    for a, e in zip(*outputs):
        assert_close(a, e, 1e-4, "kdfast vs eager")


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (interpreted on the CPU)")
@pytest.mark.parametrize("form", ["hidden+bias", "logits", "topk-bucket"])
def test_verified_first_use_checks_the_divergence_kernel(form, monkeypatch):
    """On a GPU, auto's first call of an unvalidated kernel is checked (kdfast/_verify.py) on
    the logits of the call's first rows; here on interpreted Triton: a correct kernel passes,
    a kernel whose losses are off fails (auto then takes the next backend)."""
    from kdfast import _verify
    import kdfast.triton.softmax_kl as triton_kernels

    monkeypatch.setenv("KDFAST_VERIFY", "always")
    h, w, b, teacher, target = make(torch.float32, n=12, v=20)
    t = teacher_form(teacher, form)
    kw = dict(T=1.0, ignore_index=-100, divergence="jsd", jsd_beta=0.5, tail="bucket")
    name = "softmax_kl_topk_triton" if form.startswith("topk") else "softmax_kl_triton"
    _verify.reset()
    assert op._verification("fused_linear_kd", h, w, b, teacher_args(t), target, kw)("triton") is True
    good = getattr(triton_kernels, name)

    def off_by_one(*args):
        rows, grad = good(*args)
        return rows + 1, grad

    monkeypatch.setattr(triton_kernels, name, off_by_one)
    _verify.reset()
    with pytest.warns(RuntimeWarning, match="does not match the PyTorch reference"):
        assert op._verification("fused_linear_kd", h, w, b, teacher_args(t), target, kw)("triton") is False
    _verify.reset()
