"""kdfast's benchmark harness: every benchmark declares cases, this module times them.

A case is one operation at one size with several providers (kdfast backends, fasterai's
eager formula, torch.compile of it, peers when importable). Each provider is built,
warmed up, timed (median of repeats: CUDA events on a GPU, perf_counter on the CPU),
measured once for peak extra memory (CUDA allocator stats; the CPU allocator's events from
the profiler), then freed before the next. Ratios between providers are computed from
one run, side by side; floors a case declares are recorded as met or not.

Each run also measures the machine's copy bandwidth (``copy_bandwidth``); a timing whose
case declares its minimal memory traffic reports its effective GB/s and that as a fraction
of the copy bandwidth. A case of a sweep names the shape key it varies (``sweep``), which
``kdfast bench --plot`` draws on the x axis (kdfast/bench/plot.py).

Results are JSON lines: one record per provider, one per ratio, each with the
environment (device, torch, triton, kdfast commit, date, copy bandwidth). Every timing also records
the first call and the 90th percentile. A case may ask for more (self-contained additions at
the end of this module): steadiness (the provider's calls alone and each after a large freshly
written temporary, with page faults per call and the kernel's memory counters; the cost of
writing fresh memory), and floors measured in the same run (the copy rate at the case's
traffic and the exp throughput of the kernels' own exp, for the memory and compute floors).
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
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
class Steadiness:
    """Single calls of ``providers`` beside their median: the first call, the 90th percentile,
    and a second series where every call follows a freshly written temporary of
    ``temporary_bytes`` (as an eager loss elsewhere in a training step makes). Met when the
    90th percentile is at most ``max_p90_ratio`` × the median in both series."""
    providers: list[str]
    temporary_bytes: int
    max_p90_ratio: float = 1.25
    fresh_bytes: int | None = None  # also time the first write of this much fresh memory (fresh_memory)


@dataclass
class Roofline:
    """Floors of ``provider``'s time measured in the same run: memory (the case's min_bytes at
    the copy rate of a plain tensor copy moving as many bytes) and compute (``exps`` calls of
    exp at this machine's throughput, for the exp kdfast's kernels use and for ATen's).
    Met when the median is within ``within`` × the larger floor and, when ``copy_fraction``
    is set, the effective bandwidth reaches that fraction of the copy rate."""
    provider: str
    exps: int = 0
    within: float | None = 1.5
    copy_fraction: float | None = None


@dataclass
class StoredRatio:
    """What ``provider`` keeps of an input (``what``, e.g. the teacher) must be at least
    ``smaller`` times fewer bytes than what ``baseline`` keeps of it."""
    what: str
    provider: str
    provider_bytes: int
    baseline: str
    baseline_bytes: int
    smaller: float


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
    stored_ratios: list[StoredRatio] = field(default_factory=list)
    note: str = ""
    sweep: str | None = None           # the shape key a sweep varies (the x axis of --plot)
    steadiness: Steadiness | None = None    # first call, p90, interleaved with temporaries
    roofline: Roofline | None = None        # memory and compute floors measured in the run
    repeats: tuple[int, int] | None = None  # (warmup, repeat) for calls of seconds, instead of the run's
    interleave: bool = False           # time the providers in turns (see _interleaved)


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
    env = {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
           "kdfast_commit": kdfast_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
               timespec="seconds")}
    if hasattr(os, "getloadavg"):  # how busy the machine was (other processes share its cores)
        env["load_average_1min"] = round(os.getloadavg()[0], 2)
    return env


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
    """Peak bytes allocated by one call beyond what existed before it (outputs included:
    the runners of fwd_bwd start without a gradient)."""
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


def copy_bandwidth(device: str, nbytes: int | None = None, repeat: int = 11) -> float:
    """The machine's copy bandwidth in GB/s: ``dst.copy_(src)`` of a buffer far larger than
    the caches (256 MiB on the CPU, 1 GiB on a GPU), bytes read plus bytes written over the
    fastest of ``repeat`` copies (what the machine can do: on a shared machine the median
    copy waits for other work)."""
    nbytes = nbytes or (2**30 if device == "cuda" else 2**28)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = time_runner(lambda: dst.copy_(src), device, warmup=2, repeat=repeat)
    return 2 * nbytes / (min(times) * 1e-3) / 1e9


class Progress:
    """A progress bar on stderr, on a terminal only: providers timed of how many, elapsed
    and estimated time left, what runs now. ``log`` prints a line above it."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream = total, 0, stream
        self.enabled = total > 0 and stream.isatty()
        self.start_time, self.label = time.perf_counter(), ""

    def _draw(self) -> None:
        elapsed = time.perf_counter() - self.start_time
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        filled = int(24 * self.done / self.total)
        self.stream.write(f"\r\033[K[{'#' * filled}{'.' * (24 - filled)}] {self.done}/{self.total} "
                          f"{elapsed:4.0f}s, ~{left:.0f}s left  {self.label}"[:160])
        self.stream.flush()

    def start(self, label: str) -> None:
        """A provider starts; the previous one, if any, is done."""
        if self.label:
            self.done += 1
        self.label = label
        if self.enabled:
            self._draw()

    def log(self, line: str) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()
        print(line, flush=True)
        if self.enabled:
            self._draw()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()


def run_case(case: Case, warmup: int, repeat: int, log=print, copy_gbps: float | None = None,
             progress: Progress | None = None) -> list[dict[str, Any]]:
    env = environment(case.device)
    base = {**env, "op": case.op, "shape": case.shape, "dtype": str(case.dtype).replace("torch.", "")}
    if case.note:
        base["note"] = case.note
    if case.sweep:
        base["sweep"] = case.sweep
    if copy_gbps:
        base["copy_gbps"] = copy_gbps
    records, medians, measured, reference = [], {}, {}, None
    timed = _interleaved(case, warmup, repeat, progress) if case.interleave else {}
    for name, provider in case.providers.items():
        if progress is not None and not case.interleave:
            progress.start(f"{case.op} {' '.join(f'{k}={v}' for k, v in case.shape.items())} {name}")
        record = {**base, "kind": "timing", "provider": name}
        try:
            if case.interleave:
                found = timed.pop(name)
                if isinstance(found, Exception):
                    raise found
                run, output, first, times = found
            else:
                run = provider()
                output, first = _first_call(run, case.device)
            if output is not None:  # the output against the first provider's (the eager formula), once
                if reference is None:
                    reference = output
                else:
                    record["vs_first_provider"] = _max_relative_error(output, reference)
            output = None  # (a kept gradient would keep its memory from the next calls)
            if not case.interleave:
                times = time_runner(run, case.device, warmup, repeat)
            record.update(median_ms=statistics.median(times), p20_ms=quantile(times, 0.2),
                          p80_ms=quantile(times, 0.8), p90_ms=quantile(times, 0.9), first_ms=first,
                          repeats=repeat)
            if case.steadiness and name in case.steadiness.providers:
                record["steadiness"] = steadiness_series(run, case, repeat)
            if hasattr(run, "extra_record"):  # what the runner measured itself (e.g. a compile time)
                record.update(run.extra_record())
            if case.min_bytes:
                record["min_bytes"] = case.min_bytes
                record["effective_gbps"] = case.min_bytes / (record["median_ms"] * 1e-3) / 1e9
                if copy_gbps:
                    record["copy_fraction"] = record["effective_gbps"] / copy_gbps
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
    for stored in case.stored_ratios:
        ratio = stored.baseline_bytes / stored.provider_bytes
        record = {**base, "kind": "stored", "what": stored.what, "provider": stored.provider,
                  "baseline": stored.baseline, "bytes": stored.provider_bytes, "baseline_bytes": stored.baseline_bytes,
                  "smaller": ratio, "floor": stored.smaller, "met": ratio >= stored.smaller}
        records.append(record)
        log(_format(record))
    for r in steadiness_records(case, base, measured) + roofline_records(case, base, measured):
        records.append(r)
        log(_format(r))
    return records


def _first_call(run, device: str) -> tuple[Any, float]:
    """The runner's first call (also a warm-up call): its output and its time in ms."""
    t0 = time.perf_counter()
    output = run()
    _sync(device)
    return output, (time.perf_counter() - t0) * 1e3


def _interleaved(case: Case, warmup: int, repeat: int, progress: Progress | None) -> dict[str, Any]:
    """Every provider built and called once, then timed in turns (1, 2, 3, 1, 2, 3, ...):
    on a machine shared with other work, load that comes and goes falls on every provider
    alike instead of on whichever ran then. Per provider (runner, first output, first call in ms,
    times in ms) or the exception it raised."""
    found: dict[str, Any] = {}
    for name, provider in case.providers.items():
        if progress is not None:
            progress.start(f"{case.op} {' '.join(f'{k}={v}' for k, v in case.shape.items())} {name}")
        try:
            run = provider()
            found[name] = (run, *_first_call(run, case.device), [])
        except Exception as e:  # reported by run_case
            found[name] = e
    for i in range(warmup + repeat):
        for name, entry in list(found.items()):
            if isinstance(entry, Exception):
                continue
            try:
                ms = time_runner(entry[0], case.device, 0, 1)[0]
            except Exception as e:
                found[name] = e
                continue
            if i >= warmup:
                entry[3].append(ms)
    return found


def _max_relative_error(output, reference) -> float:
    """Largest error of a runner's tensors (loss, gradients) relative to the magnitude of the
    reference's, over the tensors."""
    pairs = zip(output, reference) if isinstance(output, (tuple, list)) else [(output, reference)]
    errors = [float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))
              for a, b in pairs if isinstance(a, torch.Tensor) and a.shape == b.shape]
    return max(errors, default=float("nan"))


def _format(r: dict[str, Any]) -> str:
    head = f"{r['op']:<22} {json.dumps(r['shape']):<40} {r['dtype']:<9} {r['provider']:<24}"
    if "error" in r and "speedup" not in r:
        return f"{head} ERROR {r['error']}"
    met = "met" if r.get("met") else "NOT met"
    if r["kind"] == "ratio":
        return f"{head} {r['speedup']:7.2f}x vs {r['baseline']} (floor {r['floor']}x: {met})"
    if r["kind"] == "bandwidth":
        return f"{head} {r['effective_gbps'] or 0:8.1f} GB/s effective (floor {r['floor_gbps']}: {met})"
    if r["kind"] == "stored":
        return (f"{head} {r['what']}: {r['bytes'] / 2**20:.2f} MB vs {r['baseline_bytes'] / 2**20:.1f} MB "
                f"({r['smaller']:.0f}x smaller, floor {r['floor']:g}x: {met})")
    if r["kind"] == "memory":
        of = f" = {r['fraction']:g} x {r['baseline']}" if "baseline" in r else ""
        return f"{head} {r['peak_extra_mb'] or 0:9.1f} MB extra (ceiling {r['ceiling_mb']:.1f}{of}: {met})"
    if r["kind"] == "fresh_memory":
        return f"{head} {_format_extra(r)}"
    if r["kind"] in ("steadiness", "roofline", "copy_fraction"):
        return f"{head} {_format_extra(r)} ({met})"
    text = f"{head} {r['median_ms']:10.3f} ms (p90 {r['p90_ms']:.3f}, first {r['first_ms']:.3f})"
    if "vs_first_provider" in r:
        text += f" (max rel. diff {r['vs_first_provider']:.1e})"
    if "effective_gbps" in r:
        text += f" {r['effective_gbps']:8.1f} GB/s"
    if "copy_fraction" in r:
        text += f" ({r['copy_fraction']:4.2f} of copy)"
    if "peak_extra_mb" in r:
        text += f" {r['peak_extra_mb']:9.1f} MB extra"
    return text


def write_records(records: list[dict[str, Any]], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def kdfast_backends(kernels, device: str, with_torch: bool = True) -> list[str]:
    """kdfast's backends to time for an op family on this device: those that can run it
    here (Triton on a GPU only: interpreted, it is not worth timing)."""
    from .. import _backend

    names = _backend.BACKENDS if with_torch else _backend.BACKENDS[1:]
    return [b for b in names if _backend.unavailable_reason(b, device, kernels) is None
            and not (b == "triton" and device == "cpu")]


def fwd_bwd(loss_fn: Callable[..., torch.Tensor], student, *args, **kwargs) -> Runner:
    """A runner computing ``loss_fn(student, *args)`` and its gradient w.r.t. ``student`` (a
    tensor, or a list of them). The gradient is dropped at the end of the call, so that
    each call starts without one: its peak extra memory counts the gradient it writes. Returns
    the loss and the gradients (checked once against the first provider's)."""
    students = student if isinstance(student, (list, tuple)) else [student]

    def run():
        loss = loss_fn(student, *args, **kwargs)
        loss.backward()
        grads = [s.grad for s in students]
        for s in students:
            s.grad = None
        return (loss.detach(), *grads)  # checked once against the eager formula's
    return run


def rotating_inputs(make: Callable[[], tuple], nbytes: int, device: str, l2_bytes: int = 60 * 2**20):
    """Several copies of small inputs on a GPU so repeats do not hit in L2."""
    copies = 1 if device != "cuda" else max(1, min(8, (4 * l2_bytes) // max(nbytes, 1)))
    return [make() for _ in range(copies)]


# ---- steadiness and floors ---------------------------------------------------------------

_VMSTAT_KEYS = ("thp_fault_alloc", "thp_fault_fallback", "compact_stall", "pgfault")


def _vmstat() -> dict[str, int]:
    """Counters of transparent huge pages and compaction (Linux; {} elsewhere), and on a
    virtual machine with free page reporting, the KB of freed memory handed back to the host
    (which then faults it in again on its next use)."""
    counters = {}
    try:
        with open("/proc/vmstat") as f:
            pairs = (line.split() for line in f)
            counters = {k: int(v) for k, v in pairs if k in _VMSTAT_KEYS}
        with open("/sys/module/page_reporting/parameters/reported_kib") as f:
            counters["page_reporting_reported_kib"] = int(f.read())
    except (OSError, ValueError):
        pass
    return counters


def _page_faults() -> int:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return 0


def _timed_series(run: Runner, device: str, repeat: int, before=None) -> dict[str, Any]:
    """Times ``repeat`` calls (``before()`` untimed ahead of each); page faults per call and the
    machine's THP/compaction counters over the series."""
    times, faults = [], []
    vm0 = _vmstat()
    for _ in range(repeat):
        if before is not None:
            before()
        _sync(device)
        f0 = _page_faults()
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        faults.append(_page_faults() - f0)
    vm1 = _vmstat()
    return {"median_ms": statistics.median(times), "p90_ms": quantile(times, 0.9), "times_ms": times,
            "page_faults_per_call": statistics.median(faults),
            "vmstat": {k: vm1[k] - vm0[k] for k in vm0 if k in vm1}}


def steadiness_series(run: Runner, case: Case, repeat: int) -> dict[str, Any]:
    """The provider's calls alone and interleaved with a large freshly written temporary."""
    def temporary():
        x = torch.empty(case.steadiness.temporary_bytes, dtype=torch.uint8, device=case.device)
        x.fill_(1)
        del x
    return {"alone": _timed_series(run, case.device, repeat),
            "interleaved": _timed_series(run, case.device, repeat, temporary),
            "temporary_mb": case.steadiness.temporary_bytes / 2**20}


def fresh_memory(nbytes: int, pause_s: float = 3.0) -> dict[str, Any]:
    """Milliseconds (and system milliseconds) to write ``nbytes`` of memory as a kernel writes a
    new output, on this machine's threads: fresh with 4 KB pages, fresh advised as 2 MB huge
    pages (right after the same amount was freed, and after a pause of ``pause_s``: on a
    virtual machine with free page reporting the freed memory goes back to the host meanwhile),
    and memory written before. Linux (huge pages through madvise)."""
    import ctypes
    import resource
    libc = ctypes.CDLL(None)
    huge = 2 << 20

    def write(advise: bool, pause: float = 0.0, x: torch.Tensor | None = None):
        time.sleep(pause)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        if x is None:
            x = torch.empty(nbytes // 4)
            if advise and platform.system() == "Linux":
                begin = (x.data_ptr() + huge - 1) & ~(huge - 1)
                end = (x.data_ptr() + x.nbytes) & ~(huge - 1)
                libc.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(max(0, end - begin)), 14)  # MADV_HUGEPAGE
        x.fill_(1.0)
        ms = (time.perf_counter() - t0) * 1e3
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return x, {"ms": ms, "system_ms": (r1.ru_stime - r0.ru_stime) * 1e3}

    out = {"mb": nbytes / 2**20}
    x, _ = write(True)  # warm-up: the process's first large allocation
    del x
    x, out["fresh_4k_pages"] = write(False)
    del x
    x, out["fresh_huge_pages"] = write(True)
    del x
    vm0 = _vmstat()
    x, out["fresh_huge_pages_after_pause"] = write(True, pause_s)
    vm1 = _vmstat()
    out["fresh_huge_pages_after_pause"]["pause_s"] = pause_s
    if "page_reporting_reported_kib" in vm0:
        out["fresh_huge_pages_after_pause"]["reported_to_host_mb"] = (
            vm1["page_reporting_reported_kib"] - vm0["page_reporting_reported_kib"]) / 1024
    _, out["written_before"] = write(True, x=x)
    return out


def steadiness_records(case: Case, base: dict[str, Any], measured: dict[str, dict]) -> list[dict[str, Any]]:
    records = []
    if case.steadiness is None:
        return records
    if case.steadiness.fresh_bytes and case.device == "cpu":
        try:
            record = {**base, "kind": "fresh_memory", "provider": "first write", "met": True,
                      **fresh_memory(case.steadiness.fresh_bytes)}
        except (OSError, AttributeError) as e:
            record = {**base, "kind": "fresh_memory", "provider": "first write", "met": True,
                      "error": f"{type(e).__name__}: {e}"}
        records.append(record)
    limit = case.steadiness.max_p90_ratio
    for name in case.steadiness.providers:
        series = measured.get(name, {}).get("steadiness")
        record = {**base, "kind": "steadiness", "provider": name, "max_p90_ratio": limit}
        if series is None:
            record.update(met=False, error="the provider did not run")
        else:
            # Each series' p90 against its own median: the slow mode is single calls several
            # times slower than their neighbours. The interleaved median against the one alone
            # (interleaved_vs_alone) is recorded beside: where the last-level cache holds the
            # case's inputs (hundreds of MB on some Xeons), a call after a large temporary
            # reads them from memory, every call a little slower, which is no slow mode.
            a, i = series["alone"], series["interleaved"]
            record.update(first_ms=measured[name]["first_ms"], median_ms=a["median_ms"], p90_ms=a["p90_ms"],
                          p90_ratio=a["p90_ms"] / a["median_ms"], interleaved_median_ms=i["median_ms"],
                          interleaved_p90_ms=i["p90_ms"], interleaved_p90_ratio=i["p90_ms"] / i["median_ms"],
                          interleaved_vs_alone=i["median_ms"] / a["median_ms"],
                          page_faults_per_call=a["page_faults_per_call"],
                          interleaved_page_faults_per_call=i["page_faults_per_call"],
                          temporary_mb=series["temporary_mb"])
            record["met"] = record["p90_ratio"] <= limit and record["interleaved_p90_ratio"] <= limit
        records.append(record)
    return records


def copy_rate_gbps(traffic_bytes: int, device: str, repeat: int = 9) -> float:
    """Bytes read + written per second by a plain tensor copy moving ``traffic_bytes`` (half
    read, half written; both tensors already written once, so no page faults are timed)."""
    n = max(1, traffic_bytes // 2)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.zeros(n, dtype=torch.uint8, device=device)
    times = time_runner(lambda: dst.copy_(src), device, 2, repeat)
    return 2 * n / (statistics.median(times) * 1e-3) / 1e9


def exp_rates(device: str) -> dict[str, float]:
    """Exponentials per second on this machine's threads, for each exp implementation kdfast's
    CPU kernels can use (``torch.ops.kdfast_C.cpu_exp``: the kernels' own vector code on
    an input held in the L2 caches, so that memory plays no part)."""
    if device != "cpu":
        return {}
    try:
        from kdfast import _extension
        if not _extension.LOADED or not hasattr(torch.ops.kdfast_C, "cpu_exp"):
            return {}
    except ImportError:
        return {}
    rates = {}
    # 16K values a thread: in + out is 128 KB, well inside a core's L2.
    x = -20 * torch.rand(16384 * torch.get_num_threads())
    for impl in ("kernel", "sleef"):
        repeats = 1
        # Grow until even the fastest of 3 calls takes 200 ms, so that the call's overhead and
        # the wait for a descheduled thread are a small part of it (on a loaded machine every
        # parallel call waits ~24 ms for its second thread, however little work it holds);
        # then the median of 5 calls, as the timings it is set against.
        while True:
            times = time_runner(lambda: torch.ops.kdfast_C.cpu_exp(x, impl, repeats), device, 1, 3)
            if min(times) > 200 or repeats > 2**20:
                break
            repeats *= 4
        times = time_runner(lambda: torch.ops.kdfast_C.cpu_exp(x, impl, repeats), device, 0, 5)
        rates[impl] = x.numel() * repeats / (statistics.median(times) * 1e-3)
    return rates


def roofline_records(case: Case, base: dict[str, Any], measured: dict[str, dict]) -> list[dict[str, Any]]:
    roof = case.roofline
    if roof is None or not case.min_bytes:
        return []
    copy_gbps = copy_rate_gbps(case.min_bytes, case.device)
    timing = measured.get(roof.provider)
    records = []
    if roof.within is not None:
        record = {**base, "kind": "roofline", "provider": roof.provider, "within": roof.within,
                  "min_bytes": case.min_bytes, "copy_gbps": copy_gbps,
                  "memory_floor_ms": case.min_bytes / (copy_gbps * 1e9) * 1e3, "exps": roof.exps}
        rates = exp_rates(case.device) if roof.exps else {}
        record["exp_per_s"] = rates
        record["compute_floor_ms"] = {impl: roof.exps / rate * 1e3 for impl, rate in rates.items()}
        floor = max([record["memory_floor_ms"], record["compute_floor_ms"].get("kernel", 0.0)])
        record["floor_ms"] = floor
        if timing is None:
            record.update(met=False, error="the provider did not run")
        else:
            record["median_ms"] = timing["median_ms"]
            record["of_floor"] = timing["median_ms"] / floor
            record["met"] = record["of_floor"] <= roof.within
        if roof.exps and "kernel" not in rates:
            record.update(met=False, error="no exp rate: kdfast._C without cpu_exp")
        records.append(record)
    if roof.copy_fraction is not None:
        record = {**base, "kind": "copy_fraction", "provider": roof.provider, "floor_fraction": roof.copy_fraction,
                  "min_bytes": case.min_bytes, "copy_gbps": copy_gbps}
        if timing is None:
            record.update(met=False, error="the provider did not run")
        else:
            record["effective_gbps"] = timing["effective_gbps"]
            record["fraction"] = timing["effective_gbps"] / copy_gbps
            record["met"] = record["fraction"] >= roof.copy_fraction
        records.append(record)
    return records


def _format_extra(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    if r["kind"] == "fresh_memory":
        return (f"{r['mb']:.0f} MB: 4 KB pages {r['fresh_4k_pages']['ms']:.1f} ms, huge pages "
                f"{r['fresh_huge_pages']['ms']:.1f} ms, huge pages after a pause "
                f"{r['fresh_huge_pages_after_pause']['ms']:.1f} ms, written before {r['written_before']['ms']:.1f} ms")
    if r["kind"] == "steadiness":
        return (f"first {r['first_ms']:.1f} ms, p90 {r['p90_ratio']:.2f}x median {r['median_ms']:.1f} ms, "
                f"interleaved with {r['temporary_mb']:.0f} MB: median {r['interleaved_median_ms']:.1f} "
                f"({r['interleaved_vs_alone']:.2f}x alone), p90 {r['interleaved_p90_ratio']:.2f}x its median "
                f"(limit {r['max_p90_ratio']}x); "
                f"page faults/call {r['page_faults_per_call']:.0f} / {r['interleaved_page_faults_per_call']:.0f}")
    if r["kind"] == "roofline":
        compute = ", ".join(f"{k} exp {v:.1f} ms" for k, v in r["compute_floor_ms"].items())
        return (f"{r['median_ms']:.2f} ms = {r['of_floor']:.2f}x floor {r['floor_ms']:.2f} ms (memory "
                f"{r['memory_floor_ms']:.2f} ms at {r['copy_gbps']:.1f} GB/s; compute {compute or 'n/a'}; "
                f"limit {r['within']}x)")
    return (f"{r['effective_gbps']:.1f} GB/s = {r['fraction']:.2f} of the copy rate {r['copy_gbps']:.1f} GB/s "
            f"at {r['min_bytes'] / 1e6:.0f} MB (floor {r['floor_fraction']})")
