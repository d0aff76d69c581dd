"""Run kdfast's benchmarks and write their results as JSON lines.

    kdfast bench                      # every benchmark, on the GPU if there is one
    kdfast bench softmax_kl --quick   # one family, small sizes
    OUT=dir kdfast bench              # results into dir (as `make gpu-check` does)
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os

import torch

from .harness import run_case, write_records

FAMILIES = ["softmax_kl", "attention", "relational", "callback"]
def results_folder() -> str:
    """$OUT, else bench/results of the current directory when it has one (a source
    checkout: committed results), else the current directory."""
    return os.environ.get("OUT") or ("bench/results" if os.path.isdir("bench/results") else ".")


def default_output(device: str) -> str:
    folder = results_folder()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = torch.cuda.get_device_name().replace(" ", "-") if device == "cuda" else "cpu"
    return os.path.join(folder, f"{name.lower()}_{stamp}.jsonl")


def run(names: list[str], out: str | None, quick: bool, device: str | None = None) -> int:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(FAMILIES)}")
        return 2
    out = out or default_output(device)
    warmup, repeat = (1, 3) if quick else ((3, 11) if device == "cpu" else (5, 25))
    records = []
    for name in names or FAMILIES:
        try:
            module = importlib.import_module(f"kdfast.bench.{name}")
        except ImportError as e:  # e.g. fastai is not installed on this machine
            print(f"{name}: skipped ({e})")
            continue
        for case in module.cases(device, quick):
            case_records = run_case(case, warmup, repeat)
            write_records(case_records, out)  # case by case: a run cut short keeps what it measured
            records += case_records
    failed = [r for r in records if r["kind"] != "timing" and not r.get("met")]
    print(f"\n{len(records)} records -> {out}")
    for r in failed:
        print(f"floor not met: {r['op']} {r['provider']} ({r['kind']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdfast bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(FAMILIES)})")
    parser.add_argument("--out", help="results file (default: <device>_<time>.jsonl in $OUT, else in "
                                      "./bench/results when it exists, else in the current directory)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke test)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    args = parser.parse_args(argv)
    return run(args.names, args.out, args.quick, args.device)
