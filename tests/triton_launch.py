"""Triton's interpreter made to launch kernels as a GPU does (applied to every test by
conftest.py, whenever Triton runs interpreted).

Two differences let kernels pass on the CPU that fail on a GPU:
- a Python ``float`` argument is an fp32 kernel parameter on a real launch, while the
  interpreter keeps it a double: an fp64 kernel handed an fp64 constant as a float (1/B²,
  eps) is exact on the CPU and off by ~1e-8 relative on the GPU;
- a real launch limits grid axis 0 to 2^31 - 1 programs and axes 1 and 2 to 65535; the
  interpreter runs any grid.
Under ``launch_semantics()`` float arguments reach the kernel rounded to fp32, as fp32
scalars, and a grid beyond the limits raises. ``recorded_launches()`` records each launch's
kernel and grid without running it (grids too large to interpret).
"""
from __future__ import annotations

import contextlib

import numpy as np

GRID_LIMITS = (2**31 - 1, 65535, 65535)


class GridTooLarge(RuntimeError):
    """A launch whose grid a GPU would reject."""


def check_grid(name: str, grid) -> None:
    for axis, (size, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if size > limit:
            raise GridTooLarge(f"{name}: grid {tuple(grid)} has {size} programs on axis {axis}, a GPU allows "
                               f"{limit}; put the large count on axis 0")


@contextlib.contextmanager
def launch_semantics():
    """Float arguments as fp32 scalars and GPU grid limits, for every interpreted launch."""
    import triton.language as tl
    from triton.runtime import interpreter

    convert, run = interpreter._implicit_cvt, interpreter.InterpretedFunction.run

    def implicit_cvt(arg):
        if isinstance(arg, float):  # (bool and int are not floats)
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return convert(arg)

    def checked_run(self, *args, grid, warmup, **kwargs):
        if not callable(grid):
            check_grid(self.fn.__name__, tuple(grid) if isinstance(grid, (tuple, list)) else (grid,))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter._implicit_cvt, interpreter.InterpretedFunction.run = implicit_cvt, checked_run
    try:
        yield
    finally:
        interpreter._implicit_cvt, interpreter.InterpretedFunction.run = convert, run


@contextlib.contextmanager
def recorded_launches():
    """Yields a list that gets (kernel name, grid) for each launch; the kernels do not run."""
    from triton.runtime import interpreter

    run, launches = interpreter.InterpretedFunction.run, []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self.fn.__name__, tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)))

    interpreter.InterpretedFunction.run = record
    try:
        yield launches
    finally:
        interpreter.InterpretedFunction.run = run
