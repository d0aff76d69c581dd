"""Time kdfast's kernels against their peers and write the results as JSON lines.

    kdfast bench                         # every family: cases with floors, then size sweeps
    kdfast bench softmax_kl --plot       # one family; PNG plots of its sweep next to the results
    kdfast bench --quick                 # small sizes and few repeats (a smoke test)
    kdfast bench --no-sweep              # the cases with floors only (a short validation run)
    kdfast bench --plot --from FILE      # plot an existing results file, run nothing
    OUT=dir kdfast bench                 # results into dir

Every run first measures the machine's copy bandwidth; timings of cases that declare their
minimal memory traffic report effective GB/s and that as a fraction of the copy bandwidth.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os

import torch

from .harness import Progress, copy_bandwidth, environment, run_case, write_records

FAMILIES = ["softmax_kl", "divergences", "attention", "relational", "callback"]


def results_folder() -> str:
    """$OUT, else bench/results of the current directory when it has one (a source
    checkout: committed results), else the current directory."""
    return os.environ.get("OUT") or ("bench/results" if os.path.isdir("bench/results") else ".")


def default_output(device: str) -> str:
    folder = results_folder()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = torch.cuda.get_device_name().replace(" ", "-") if device == "cuda" else "cpu"
    return os.path.join(folder, f"{name.lower()}_{stamp}.jsonl")


def plot(path: str) -> int:
    try:
        from .plot import plot_results
        written = plot_results(path)
    except ImportError as e:
        print(f"kdfast bench --plot needs matplotlib ({e}): pip install matplotlib; the results are in {path}")
        return 2
    if not written:
        print(f"{path} holds no size sweep to plot (run kdfast bench without --no-sweep)")
        return 2
    for name in written:
        print(f"plot -> {name}")
    return 0


def collect_cases(names: list[str], device: str, quick: bool, sweeps: bool) -> list[tuple[list, tuple[int, int]]]:
    """(cases, (warmup, repeat)) per family and kind: every family's cases with floors at
    full repeats first (a run cut short still has them), then the sweeps at fewer."""
    if quick:
        full = small = (1, 3)
    else:
        full, small = ((3, 11), (1, 5)) if device == "cpu" else ((5, 25), (2, 10))
    modules = []
    for name in names or FAMILIES:
        try:
            modules.append(importlib.import_module(f"kdfast.bench.{name}"))
        except ImportError as e:  # e.g. fastai is not installed on this machine
            print(f"{name}: skipped ({e})")
    plan = [(module.cases(device, quick), full) for module in modules]
    if sweeps:
        plan += [(module.sweep(device, quick), small) for module in modules if hasattr(module, "sweep")]
    return plan


def run(names: list[str], out: str | None, quick: bool, device: str | None = None, sweeps: bool = True) -> str | None:
    """Run the benchmarks; returns the results file (None when nothing could run)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(FAMILIES)}")
        return None
    out = out or default_output(device)
    copy_gbps = copy_bandwidth(device)
    write_records([{**environment(device), "kind": "copy", "op": "copy", "provider": "torch.Tensor.copy_",
                    "copy_gbps": copy_gbps}], out)
    print(f"copy bandwidth on {device}: {copy_gbps:.1f} GB/s (read + write)")
    plan = collect_cases(names, device, quick, sweeps)
    progress = Progress(sum(len(case.providers) for cases, _ in plan for case in cases))
    records = []
    try:
        for cases, (warmup, repeat) in plan:
            for case in cases:
                case_records = run_case(case, warmup, repeat, log=progress.log, copy_gbps=copy_gbps,
                                        progress=progress)
                write_records(case_records, out)  # case by case: a run cut short keeps what it measured
                records += case_records
    finally:
        progress.close()
    failed = [r for r in records if r["kind"] not in ("timing", "copy") and not r.get("met")]
    print(f"\n{len(records)} records -> {out}")
    for r in failed:
        print(f"floor not met: {r['op']} {r['provider']} ({r['kind']})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdfast bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(FAMILIES)})")
    parser.add_argument("--out", help="results file (default: <device>_<time>.jsonl in $OUT, else in "
                                      "./bench/results when it exists, else in the current directory)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke test)")
    parser.add_argument("--no-sweep", action="store_true", help="only the cases with floors, no size sweeps")
    parser.add_argument("--plot", action="store_true",
                        help="draw the size sweeps (time, GB/s, peak memory per provider) as PNG files next to "
                             "the results (needs matplotlib)")
    parser.add_argument("--from", dest="from_file", metavar="FILE",
                        help="with --plot: plot this results file instead of running the benchmarks")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads; default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_file:
        if not args.plot:
            parser.error("--from FILE goes with --plot")
        return plot(args.from_file)
    out = run(args.names, args.out, args.quick, args.device, sweeps=not args.no_sweep)
    if out is None:
        return 2
    return plot(out) if args.plot else 0
