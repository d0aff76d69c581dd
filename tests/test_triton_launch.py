"""Interpreted Triton kernels are launched as on a GPU (tests/triton_launch.py, applied to
every test by conftest.py): float arguments arrive as fp32, grids keep a GPU's limits."""
import os

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from triton_launch import GridTooLarge, check_grid, recorded_launches  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="these check Triton's interpreter")


@triton.jit
def _store_argument(out_ptr, x):
    tl.store(out_ptr, x)


def test_float_arguments_reach_kernels_as_fp32():
    out = torch.zeros(1, dtype=torch.float64)
    _store_argument[(1,)](out, 0.1)
    assert out.item() == float(np.float32(0.1)) and out.item() != 0.1


def test_grid_beyond_a_gpus_limits_raises():
    out = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(GridTooLarge, match="axis 1"):
        _store_argument[(1, 65536)](out, 1.0)


def test_attention_grids_fit_a_gpu_at_a_large_batch():
    """70000 samples: more programs than grid axis 1 holds (checked without running them)."""
    from kdfast.triton.attention import attention_transfer_backward_triton, attention_transfer_forward_triton

    f_s, f_t = torch.randn(70000, 2, 3, 1), torch.randn(70000, 3, 3, 1)
    with recorded_launches() as launches:
        _, maps = attention_transfer_forward_triton([f_s], [f_t], 2.0)
        attention_transfer_backward_triton(torch.ones(()), [f_s], maps, 2.0)
    assert {name for name, _ in launches} == {"_channel_mean_kernel", "_finish_kernel", "_grad_kernel"}
    for name, grid in launches:
        check_grid(name, grid)
