"""kdfast's benchmark harness: every benchmark declares cases, this module times them.

A case is one operation at one size with several providers (kdfast backends, fasterai's
eager formula, torch.compile of it, peers when importable). Each provider is built,
warmed up, timed (median of repeats: CUDA events on a GPU, perf_counter on the CPU),
measured once for peak extra memory (CUDA allocator stats; the CPU allocator's events from
the profiler), then freed before the next. Ratios between providers are computed from
one run, side by side; floors a case declares are recorded as met or not.

Results are JSON lines: one record per provider, one per ratio, each with the
environment (device, torch, triton, kdfast commit, date).
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

Runner = Callable[[], Any]           # one timed call (e.g. forward + backward)
Provider = Callable[[], Runner]      # builds inputs and returns the runner


@dataclass
class Floor:
    """``provider`` must be at least ``speedup`` times faster than ``baseline``."""
    provider: str
    baseline: str
    speedup: float


@dataclass
class MemoryRatio:
    """``provider``'s peak extra memory must be at most ``fraction`` of ``baseline``'s, both
    measured in the same run."""
    provider: str
    baseline: str
    fraction: float


@dataclass
class Case:
    op: str
    shape: dict[str, int]
    dtype: torch.dtype
    device: str
    providers: dict[str, Provider]
    min_bytes: int | None = None       # minimal memory traffic, for effective bandwidth
    floors: list[Floor] = field(default_factory=list)
    gbps_floors: dict[str, float] = field(default_factory=dict)       # provider -> min effective GB/s
    memory_ceilings: dict[str, int] = field(default_factory=dict)     # provider -> max peak extra bytes
    memory_ratios: list[MemoryRatio] = field(default_factory=list)
    note: str = ""


def kdfast_commit() -> str:
    """The git commit kdfast was imported from (an editable install in a checkout), with
    "-dirty" for uncommitted changes; "unknown" for an installed kdfast."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=package, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=package,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "") if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def environment(device: str) -> dict[str, Any]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "kdfast_commit": kdfast_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_runner(run: Runner, device: str, warmup: int, repeat: int) -> list[float]:
    """Milliseconds per call, ``repeat`` times after ``warmup`` calls."""
    for _ in range(warmup):
        run()
    _sync(device)
    times = []
    for _ in range(repeat):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def peak_extra_memory(run: Runner, device: str) -> int | None:
    """Peak bytes allocated by one call beyond what existed before it."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run_case(case: Case, warmup: int, repeat: int, log=print) -> list[dict[str, Any]]:
    env = environment(case.device)
    base = {**env, "op": case.op, "shape": case.shape, "dtype": str(case.dtype).replace("torch.", "")}
    if case.note:
        base["note"] = case.note
    records, medians, measured = [], {}, {}
    for name, provider in case.providers.items():
        record = {**base, "kind": "timing", "provider": name}
        try:
            run = provider()
            times = time_runner(run, case.device, warmup, repeat)
            record.update(median_ms=statistics.median(times), p20_ms=quantile(times, 0.2),
                          p80_ms=quantile(times, 0.8), repeats=repeat)
            if case.min_bytes:
                record["min_bytes"] = case.min_bytes
                record["effective_gbps"] = case.min_bytes / (record["median_ms"] * 1e-3) / 1e9
            peak = peak_extra_memory(run, case.device)
            if peak is not None:
                record["peak_extra_mb"] = peak / 2**20
            medians[name] = record["median_ms"]
            measured[name] = record
            del run
        except Exception as e:  # a provider that cannot run here is reported, not fatal
            record["error"] = f"{type(e).__name__}: {e}"[:500]
        gc.collect()
        if case.device == "cuda":
            torch.cuda.empty_cache()
        records.append(record)
        log(_format(record))
    for floor in case.floors:
        record = {**base, "kind": "ratio", "provider": floor.provider, "baseline": floor.baseline,
                  "floor": floor.speedup}
        if floor.provider in medians and floor.baseline in medians:
            record["speedup"] = medians[floor.baseline] / medians[floor.provider]
            record["met"] = record["speedup"] >= floor.speedup
        else:
            record["met"] = False
            record["error"] = "a provider did not run"
        records.append(record)
        log(_format(record))
    for name, floor in case.gbps_floors.items():
        value = measured.get(name, {}).get("effective_gbps")
        record = {**base, "kind": "bandwidth", "provider": name, "floor_gbps": floor, "effective_gbps": value,
                  "met": value is not None and value >= floor}
        records.append(record)
        log(_format(record))
    for name, ceiling in case.memory_ceilings.items():
        value = measured.get(name, {}).get("peak_extra_mb")
        record = {**base, "kind": "memory", "provider": name, "ceiling_mb": ceiling / 2**20, "peak_extra_mb": value,
                  "met": value is not None and value * 2**20 <= ceiling}
        records.append(record)
        log(_format(record))
    for ratio in case.memory_ratios:
        value = measured.get(ratio.provider, {}).get("peak_extra_mb")
        baseline = measured.get(ratio.baseline, {}).get("peak_extra_mb")
        ceiling = None if baseline is None else ratio.fraction * baseline
        record = {**base, "kind": "memory", "provider": ratio.provider, "baseline": ratio.baseline,
                  "fraction": ratio.fraction, "ceiling_mb": ceiling, "peak_extra_mb": value,
                  "met": value is not None and ceiling is not None and value <= ceiling}
        if ceiling is None:
            record["error"] = "the baseline did not run"
        records.append(record)
        log(_format(record))
    return records


def _format(r: dict[str, Any]) -> str:
    head = f"{r['op']:<22} {json.dumps(r['shape']):<40} {r['dtype']:<9} {r['provider']:<24}"
    if "error" in r and "speedup" not in r:
        return f"{head} ERROR {r['error']}"
    met = "met" if r.get("met") else "NOT met"
    if r["kind"] == "ratio":
        return f"{head} {r['speedup']:7.2f}x vs {r['baseline']} (floor {r['floor']}x: {met})"
    if r["kind"] == "bandwidth":
        return f"{head} {r['effective_gbps'] or 0:8.1f} GB/s effective (floor {r['floor_gbps']}: {met})"
    if r["kind"] == "memory":
        of = f" = {r['fraction']:g} x {r['baseline']}" if "baseline" in r else ""
        return f"{head} {r['peak_extra_mb'] or 0:9.1f} MB extra (ceiling {r['ceiling_mb']:.1f}{of}: {met})"
    text = f"{head} {r['median_ms']:10.3f} ms"
    if "effective_gbps" in r:
        text += f" {r['effective_gbps']:8.1f} GB/s"
    if "peak_extra_mb" in r:
        text += f" {r['peak_extra_mb']:9.1f} MB extra"
    return text


def write_records(records: list[dict[str, Any]], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def fwd_bwd(loss_fn: Callable[..., torch.Tensor], student: torch.Tensor, *args, **kwargs) -> Runner:
    """A runner computing ``loss_fn(student, *args)`` and its gradient w.r.t. ``student``."""
    def run():
        student.grad = None
        loss_fn(student, *args, **kwargs).backward()
    return run


def rotating_inputs(make: Callable[[], tuple], nbytes: int, device: str, l2_bytes: int = 60 * 2**20):
    """Several copies of small inputs on a GPU so repeats do not hit in L2."""
    copies = 1 if device != "cuda" else max(1, min(8, (4 * l2_bytes) // max(nbytes, 1)))
    return [make() for _ in range(copies)]
