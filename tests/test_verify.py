"""Verified first use (kdfast/_verify.py) and the validation record (kdfast/_validation.py).

Triton interpreted on the CPU stands in for a GPU backend: auto is made to prefer it on
CPU tensors, and the GPU's compute capability is faked. Faults are injected by replacing
a Triton kernel's wrapper with a broken one.
"""
import contextlib
import json
import warnings

import pytest
import torch

import kdfast
from kdfast import _backend, _validation, _verify
from kdfast import functional as KF

pytestmark = pytest.mark.skipif(_backend.unavailable_reason("triton", "cpu", ("triton",)) is not None,
                                reason="needs Triton (interpreted on the CPU)")

CAPABILITY = "9.0"


@pytest.fixture(autouse=True)
def triton_first(monkeypatch, tmp_path):
    """auto prefers Triton on CPU tensors, the CPU passes for a GPU of CAPABILITY, an empty
    validation record, fresh verification state."""
    monkeypatch.setitem(_backend.AUTO_ORDER, "cpu", ("triton", "cpu", "torch"))
    monkeypatch.setattr(_verify, "capability", lambda device: CAPABILITY)
    monkeypatch.setenv("KDFAST_VALIDATION_RECORD", str(tmp_path / "validation.json"))
    monkeypatch.setenv("KDFAST_VERIFY", "auto")
    _verify.reset()
    yield
    _verify.reset()


def counted(monkeypatch, module, name, fault=None):
    """Replace module.name by a wrapper counting its calls (and applying ``fault`` to its
    result)."""
    original, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        out = original(*args, **kwargs)
        return fault(out) if fault else out
    monkeypatch.setattr(module, name, wrapper)
    return calls


def softmax_triton(monkeypatch, fault=None):
    import kdfast.triton.softmax_kl as module
    return counted(monkeypatch, module, "softmax_kl_triton", fault)


@contextlib.contextmanager
def silent():
    """Fails on any warning of kdfast's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="kdfast")
        yield


def logits(shape=(6, 40), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)


def reference_loss(s, t, **kw):
    with kdfast.use_backend("torch"):
        return KF.soft_target_kl(s, t, **kw)


def test_broken_kernel_is_caught_once_and_replaced(monkeypatch):
    calls = softmax_triton(monkeypatch, fault=lambda out: (out[0] * 1.01, out[1]))  # rows 1% off
    s, t = logits(seed=1).requires_grad_(), logits(seed=2)
    with pytest.warns(RuntimeWarning, match=r"triton kernel of soft_target_kl \(float32, kernel path rows-512\)"):
        loss = KF.soft_target_kl(s, t, T=2.0)
    assert len(calls) == 1  # the check on the slice only: the call itself ran on the next backend
    assert torch.allclose(loss, reference_loss(s, t, T=2.0), rtol=1e-6)
    with silent():  # one warning per key: the second call is silent
        loss = KF.soft_target_kl(s, t, T=2.0)
        loss.backward()
    assert len(calls) == 1 and s.grad is not None
    assert torch.allclose(loss, reference_loss(s, t, T=2.0), rtol=1e-6)


def test_correct_kernel_is_checked_once_and_kept(monkeypatch):
    calls = softmax_triton(monkeypatch)
    s, t = logits(seed=3), logits(seed=4)
    with silent():
        KF.soft_target_kl(s, t)
        assert len(calls) == 2  # the slice, then the call on Triton
        KF.soft_target_kl(s, t)
        assert len(calls) == 3  # no check after the first call
    assert list(_verify._State.results.values()) == [True]


def test_each_kernel_path_and_dtype_is_checked_on_its_own(monkeypatch):
    calls = softmax_triton(monkeypatch)
    KF.soft_target_kl(logits(seed=5), logits(seed=6))
    KF.soft_target_kl(logits((2, 3, 4, 5), seed=7), logits((2, 3, 4, 5), seed=8), dim=1)  # the columns kernel
    KF.soft_target_kl(logits(dtype=torch.float64, seed=9), logits(dtype=torch.float64, seed=10))
    KF.soft_target_kl(logits((3, 600), seed=11), logits((3, 600), seed=12))  # wider tiles
    assert {(op, dtype, path) for op, _, dtype, path in _verify._State.results} == {
        ("soft_target_kl", torch.float32, "columns"), ("soft_target_kl", torch.float32, "rows-1024"),
        ("soft_target_kl", torch.float32, "rows-512"), ("soft_target_kl", torch.float64, "rows-512")}
    assert len(calls) == 8


@pytest.mark.parametrize("fault,seen", [
    (lambda out: (out[0], out[1].clone().fill_(float("nan"))), "gradient of input 0: non-finite"),
    (lambda out: (_ for _ in ()).throw(RuntimeError("CUDA error: invalid argument")), "invalid argument"),
    (lambda out: (out[0], out[1] * (1 + 1e-8)), "gradient of input 0: max error"),  # float64 precision lost
])
def test_non_finite_launch_errors_and_lost_precision_are_caught(monkeypatch, fault, seen):
    softmax_triton(monkeypatch, fault)
    s, t = logits(dtype=torch.float64, seed=13), logits(dtype=torch.float64, seed=14)
    with pytest.warns(RuntimeWarning, match=seen):
        loss = KF.soft_target_kl(s, t, T=3.0)
    assert torch.allclose(loss, reference_loss(s, t, T=3.0), rtol=1e-12)


def test_checked_inside_inference_mode_and_autocast(monkeypatch):
    calls = softmax_triton(monkeypatch)
    s, t = logits(seed=19), logits(seed=20)
    with silent(), torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        KF.soft_target_kl(s, t)
    assert len(calls) == 2 and list(_verify._State.results.values()) == [True]


def test_forced_backend_and_never_are_not_checked(monkeypatch):
    calls = softmax_triton(monkeypatch, fault=lambda out: (out[0] * 2, out[1]))
    s, t = logits(seed=15), logits(seed=16)
    with silent():
        with kdfast.use_backend("triton"):
            KF.soft_target_kl(s, t)
        monkeypatch.setenv("KDFAST_VERIFY", "never")
        KF.soft_target_kl(s, t)
    assert len(calls) == 2 and not _verify._State.results


def write_record(tmp_path, **changes):
    record = {"family": "softmax_kl", "backend": "triton", "gpu": "NVIDIA H200", "capability": CAPABILITY,
              "sources": _validation.current_hash("softmax_kl", "triton"), "commit": "abc1234",
              "date": "2026-01-01T00:00:00+00:00", "tests": 100, **changes}
    _validation.write([record], tmp_path / "validation.json")


@pytest.mark.parametrize("changes,checked", [
    ({}, False),                       # a record for this GPU and these sources: no check
    ({"capability": "8.0"}, True),     # another architecture
    ({"sources": "0" * 16}, True),     # other sources
    ({"family": "attention"}, True),   # another family
])
def test_only_a_record_for_this_arch_and_these_sources_counts(monkeypatch, tmp_path, changes, checked):
    write_record(tmp_path, **changes)
    calls = softmax_triton(monkeypatch)
    KF.soft_target_kl(logits(seed=17), logits(seed=18))
    assert len(calls) == (2 if checked else 1)
    monkeypatch.setenv("KDFAST_VERIFY", "always")  # checks even validated kernels
    _verify.reset()
    KF.soft_target_kl(logits(seed=17), logits(seed=18))
    assert len(calls) == (4 if checked else 3)


def test_source_hash_follows_the_sources(tmp_path):
    (tmp_path / "kdfast" / "triton").mkdir(parents=True)
    kernel = tmp_path / "kdfast" / "triton" / "softmax_kl.py"
    kernel.write_text("# kernel\n")
    first = _validation.hash_sources("softmax_kl", "triton", tmp_path)
    kernel.write_text("# kernel, edited\n")
    assert _validation.hash_sources("softmax_kl", "triton", tmp_path) != first
    assert _validation.hash_sources("attention", "triton", tmp_path) is None


def test_other_families_are_checked(monkeypatch):
    import kdfast.triton.attention as attention
    import kdfast.triton.relational as relational

    attention_calls = counted(monkeypatch, attention, "attention_transfer_forward_triton")
    pkt_calls = counted(monkeypatch, relational, "pkt_gram", fault=lambda out: (out[0] + 1e-3, out[1]))
    g = torch.Generator().manual_seed(0)
    f_s, f_t = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 6, 4, 4, generator=g)
    with silent():
        KF.attention_transfer(f_s.requires_grad_(), f_t)
    assert len(attention_calls) == 2
    e_s, e_t = torch.randn(30, 8, generator=g), torch.randn(30, 5, generator=g)
    with pytest.warns(RuntimeWarning, match="triton kernel of pkt"):
        loss = KF.pkt(e_s, e_t)
    with kdfast.use_backend("torch"):
        assert torch.allclose(loss, KF.pkt(e_s, e_t), rtol=1e-5)
    assert len(pkt_calls) == 1
    keys = {(op, path) for op, _, _, path in _verify._State.results}
    assert keys == {("attention_transfer", "16x256/p2"), ("pkt", "gram")}


def test_bad_verify_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("KDFAST_VERIFY", "sometimes")
    with pytest.raises(ValueError, match="KDFAST_VERIFY='sometimes'; choose one of auto, always, never"):
        KF.soft_target_kl(logits(), logits(seed=1))


def test_info_reports_validation(monkeypatch, tmp_path):
    write_record(tmp_path)
    from kdfast.info import info_text

    text = info_text()
    assert "triton  softmax_kl   validated on NVIDIA H200 (9.0) at abc1234" in text
    assert "triton  attention    unvalidated: checked on first use" in text
    assert "KDFAST_VERIFY=auto" in text


def test_merge_keeps_other_gpus():
    old = {"family": "attention", "backend": "cuda", "capability": "8.0", "sources": "a"}
    replaced = {"family": "attention", "backend": "cuda", "capability": "9.0", "sources": "a"}
    new = {"family": "attention", "backend": "cuda", "capability": "9.0", "sources": "b"}
    assert _validation.merge([old, replaced], new) == [old, new]
    assert json.loads(json.dumps(_validation.merge([], new))) == [new]


@pytest.mark.gpu
@pytest.mark.gpu_core
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("order", [("cuda", "triton", "torch"), ("triton", "torch")], ids=["cuda", "triton"])
def test_gpu_kernels_pass_their_first_use_checks(monkeypatch, order):
    """On a GPU, auto's first-use checks find the kernel paths and pass them (no warning)."""
    monkeypatch.setitem(_backend.AUTO_ORDER, "cuda", order)
    monkeypatch.setenv("KDFAST_VERIFY", "always")
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device="cuda", generator=g).to(dtype)

    with silent():
        KF.soft_target_kl(randn(6, 6144), randn(6, 6144), T=2.0)
        KF.soft_target_kl(randn(4, 60000, dtype=torch.bfloat16), randn(4, 60000, dtype=torch.bfloat16))
        KF.decoupled_kd(randn(4, 3001, dtype=torch.float64), randn(4, 3001, dtype=torch.float64),
                        torch.tensor([0, 5, 3000, -100], device="cuda"))
        KF.soft_target_kl(randn(2, 50, 3, 4), randn(2, 50, 3, 4), dim=1)
        KF.attention_transfer([randn(4, 16, 8, 8), randn(4, 8, 5, 5).to(memory_format=torch.channels_last)],
                              [randn(4, 32, 8, 8), randn(4, 4, 5, 5)])
        KF.rkd(randn(70, 40), randn(70, 30))
        KF.pkt(randn(40, 20, dtype=torch.float64), randn(40, 10, dtype=torch.float64))
        KF.similarity_preserving(randn(30, 20), randn(30, 12), p=3.5)
    results = _verify._State.results
    assert results and all(results.values()), results
    assert {backend for _, backend, _, _ in results} == {order[0]}
    assert {op for op, _, _, _ in results} == {"soft_target_kl", "decoupled_kd", "attention_transfer", "rkd", "pkt",
                                              "similarity_preserving"}
