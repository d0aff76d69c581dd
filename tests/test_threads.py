"""kdfast.use_backend is process-wide: what a second thread sees (documented in kdfast._backend)."""
import threading

import torch

import kdfast
from kdfast import functional as KF
from kdfast.ops import softmax_kl


def _in_thread(fn):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", fn()))
    thread.start()
    thread.join()
    return out["result"]


def test_a_second_thread_sees_the_backend_forced_in_the_first(monkeypatch):
    calls = []
    reference = softmax_kl.softmax_kl_ref
    monkeypatch.setattr(softmax_kl, "softmax_kl_ref", lambda *a, **k: calls.append(1) or reference(*a, **k))
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    assert _in_thread(kdfast.current_backend) == "auto"
    with kdfast.use_backend("torch"):
        assert _in_thread(kdfast.current_backend) == "torch"
        _in_thread(lambda: KF.soft_target_kl(s, t, T=2))
        assert calls, "the second thread's call did not run on the torch backend forced by the first"
    assert _in_thread(kdfast.current_backend) == "auto"


def test_a_block_in_a_second_thread_changes_the_first_threads_backend():
    entered, leave = threading.Event(), threading.Event()
    seen = []

    def worker():
        with kdfast.use_backend("torch"):
            entered.set()
            leave.wait(5)

    thread = threading.Thread(target=worker)
    thread.start()
    entered.wait(5)
    seen.append(kdfast.current_backend())  # inside the other thread's block
    leave.set()
    thread.join()
    seen.append(kdfast.current_backend())  # after it
    assert seen == ["torch", "auto"]
