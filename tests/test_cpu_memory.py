"""Large CPU outputs of the kernels on reused memory (csrc/cpu/memory.h): the gradient of the
next call lands in the memory of the last one, with no page faults; tensors behave as any
CPU tensor; the profiler counts them; the cache is bounded and can be emptied."""
import resource

import pytest
import torch

import kdfast
from kdfast import _extension
from kdfast import functional as KF
from helpers import TOLERANCE, assert_close

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason="kdfast._C is not built")

BIG = (64, 32768)  # 8 MB of float32: the smallest output that is reused


def _grad_of_call(s, t):
    s.grad = None
    with kdfast.use_backend("cpu"):
        KF.soft_target_kl(s, t, T=2.0).backward()
    return s.grad


def _page_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_the_next_call_reuses_the_gradient_memory_without_page_faults():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(BIG, generator=g).requires_grad_(), torch.randn(BIG, generator=g)
    first = _grad_of_call(s, t).data_ptr()
    s.grad = None  # the gradient's memory is kept, not returned to the system
    kept, blocks, limit = torch.ops.kdfast_C.cpu_cache_info()
    assert blocks >= 1 and kept >= s.nbytes and limit > 0
    faults = _page_faults()
    grad = _grad_of_call(s, t)
    # 8 MB of fresh memory would take 2048 faults of 4 KB (or 4 of 2 MB); a few come from elsewhere
    assert grad.data_ptr() == first and _page_faults() - faults < 64
    with kdfast.use_backend("torch"):
        s_ref = s.detach().double().requires_grad_()
        KF.soft_target_kl(s_ref, t.double(), T=2.0).backward()
    assert_close(grad, s_ref.grad, TOLERANCE[torch.float32], "grad")


def test_empty_cpu_cache_returns_the_memory():
    s, t = torch.randn(BIG).requires_grad_(), torch.randn(BIG)
    _grad_of_call(s, t)
    s.grad = None
    assert torch.ops.kdfast_C.cpu_cache_info()[1] >= 1
    torch.ops.kdfast_C.empty_cpu_cache()
    assert torch.ops.kdfast_C.cpu_cache_info()[:2] == [0, 0]


def test_reused_outputs_behave_as_cpu_tensors():
    # Layout of empty_like (channels_last kept), resizable storage, and seen by the profiler.
    g = torch.Generator().manual_seed(1)
    f_s = torch.randn(8, 256, 32, 32, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    f_t = torch.randn(8, 64, 32, 32, generator=g)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with kdfast.use_backend("cpu"):
            KF.attention_transfer(f_s, f_t).backward()
    grad = f_s.grad
    assert grad.stride() == torch.empty_like(f_s).stride()
    allocations = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert grad.nbytes in allocations
    f_ref = f_s.detach().double().requires_grad_()
    with kdfast.use_backend("torch"):
        KF.attention_transfer(f_ref, f_t.double()).backward()
    assert_close(grad, f_ref.grad, TOLERANCE[torch.float32], "grad")
    grad.resize_(2 * grad.numel())  # reallocates through the same allocator
    grad.fill_(1.0)
    assert grad.sum().item() == 2 * f_s.numel()
