"""`make gpu-check`: prove every GPU kernel path of kdfast in one short run on a GPU.

    python tests/gpu_check.py [--only softmax_kl,attention] [--deadline 400] [--out DIR]
    python tests/gpu_check.py --dry-run --out DIR     # the whole control flow on the CPU

1. preflight (seconds): nvcc, ninja, Python, torch and triton versions, the GPU; the build
   in place for this GPU's architecture under a timeout; then a loud failure unless
   kdfast._C has CUDA kernels for it;
2. smoke (~30 s): one process per kernel path (tests/gpu_smoke.py, CUDA_LAUNCH_BLOCKING=1)
   on a shape that forces it, against the float64 reference: one JSON line each, so a
   crash costs one line;
3. tests: one pytest process per kernel family and backend (`--kdfast-backend`), a few at
   a time under one global deadline: the `gpu_core` tests first, cheapest first, then the
   other GPU tests, `torch.compile` last; pytest gets SIGINT at the deadline, so it still
   writes its summary and junit XML;
4. the validation record (kdfast/validation.json) for every family and backend whose
   tests all passed;
5. benchmarks in the time left, each case checked against the eager formula once.
Files (at most 8, flat in --out, default $OUT or bench/results/): the log, the build log,
smoke.jsonl, the tests' log and junit XML, the benchmark results, validation.json and a
summary JSON; a table is printed last. Nothing here or in the processes it starts may
import fastai, fasterai, scikit-learn, trl or transformers (the GPU machine has none): in
every child process they look not installed.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parent.parent
FAMILIES = ("softmax_kl", "attention", "relational")
# Features that run a family's kernels: their tests (tests/test_<name>.py) run with the
# family's, their benchmarks (kdfast bench <name>) after the family's.
USES = {"softmax_kl": ("fused_linear",)}
BACKENDS = ("cuda", "triton")
FORBIDDEN = ("fastai", "fasterai", "sklearn", "trl", "transformers")
# Test stages in order; marker expressions (a real run adds "gpu and").
STAGES = (("core", "gpu_core"), ("rest", "not gpu_core and not compile"), ("compile", "compile"))
MISC_TESTS = ["tests/test_verify.py", "tests/test_mixed_precision.py", "tests/test_backward_memory.py",
              "tests/test_backend.py"]
# Tests of the dry run per stage (the first ones of each group): the control flow, not the tests.
DRY_RUN_FIRST = {"core": 2, "misc": 1, "rest": 1, "compile": 0}
BLOCKER = '''import importlib.machinery, sys
FORBIDDEN = {forbidden!r}
class _PathFinderWithout:
    """make gpu-check: the GPU machine has none of FORBIDDEN; here they look not installed."""
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)
    @classmethod
    def invalidate_caches(cls):
        importlib.machinery.PathFinder.invalidate_caches()
sys.meta_path[:] = [_PathFinderWithout if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
'''


class Run:
    """Paths, the deadline, the console log and the summary of one gpu-check run."""

    def __init__(self, args):
        self.args = args
        self.start = time.monotonic()
        self.deadline = self.start + args.deadline
        self.out = pathlib.Path(args.out or os.environ.get("OUT") or ROOT / "bench" / "results").resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="kdfast-gpu-check-"))
        self.files = {name: self.out / f"gpu-check_{self.stamp}_{name}" for name in
                      ("log.txt", "build.log", "smoke.jsonl", "tests.log", "junit.xml", "summary.json")}
        self.files["validation.json"] = self.out / "validation.json"
        self.log_file = open(self.files["log.txt"], "w")
        self.lock = threading.Lock()
        self.summary = {"date": self.stamp, "dry_run": args.dry_run, "only": args.only, "stages": {},
                        "smoke": [], "groups": [], "records": [], "bench": None, "problems": []}
        (self.tmp / "blocker").mkdir()
        (self.tmp / "blocker" / "sitecustomize.py").write_text(BLOCKER.format(forbidden=FORBIDDEN))
        self.env = {**os.environ, "PYTHONWARNINGS": "ignore",
                    "PYTHONPATH": os.pathsep.join([str(self.tmp / "blocker"), str(ROOT),
                                                  os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        if args.dry_run:
            self.env["TRITON_INTERPRET"] = "1"
        else:
            self.env.pop("TRITON_INTERPRET", None)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, text: str = "") -> None:
        with self.lock:
            print(text, flush=True)
            self.log_file.write(text + "\n")
            self.log_file.flush()

    def problem(self, text: str) -> None:
        self.summary["problems"].append(text)
        self.say(f"!! {text}")


def run_command(command, timeout, env=None, log=None, cwd=ROOT) -> tuple[int | str, str]:
    """(exit code, or 'timeout'; output). At the timeout the process gets SIGINT (pytest
    then writes its summary), SIGKILL 20 s later."""
    # SIGINT as the default in the child: a shell that starts this in the background (without
    # job control) leaves it ignored, and an ignored signal stays ignored across exec.
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        output, _ = process.communicate(timeout=max(timeout, 1))
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        code = "timeout"
    if log is not None:
        with open(log, "a") as f:
            f.write(output)
    return code, output


def python(run: Run, code: str, timeout: float = 60) -> dict:
    status, output = run_command([sys.executable, "-c", code], timeout, run.env)
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if status != 0 or not lines:
        return {"error": output.strip()[-2000:]}
    return json.loads(lines[-1])


def tool_version(command: list[str]) -> str:
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"missing ({e})"
    lines = [line for line in output.splitlines() if line.strip()]
    return next((line for line in lines if "release" in line), lines[-1] if lines else "?").strip()


def preflight(run: Run) -> dict | None:
    run.say(f"== preflight ({'dry run: ' if run.args.dry_run else ''}out: {run.out})")
    info = python(run, "import json, platform, torch\n"
                       "try:\n import triton; tv = triton.__version__\nexcept ImportError: tv = None\n"
                       "gpu = torch.cuda.is_available()\n"
                       "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, "
                       "'cuda': torch.version.cuda, 'triton': tv, "
                       "'gpu': torch.cuda.get_device_name() if gpu else None, "
                       "'capability': '.'.join(map(str, torch.cuda.get_device_capability())) if gpu else None}))")
    if "error" in info:
        run.problem(f"torch does not import: {info['error']}")
        return None
    info["nvcc"] = tool_version([os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                                 "--version"]) if not shutil.which("nvcc") else tool_version(["nvcc", "--version"])
    info["ninja"] = tool_version(["ninja", "--version"])
    for key in ("gpu", "capability", "python", "torch", "cuda", "triton", "nvcc", "ninja"):
        run.say(f"  {key:10s} {info.get(key)}")
    run.summary["environment"] = info
    if info["gpu"] is None and not run.args.dry_run:
        run.problem("no CUDA GPU: run `make gpu-check` on the GPU machine (or --dry-run here)")
        return None
    return info


def build(run: Run, info: dict) -> bool:
    if run.args.dry_run or run.args.no_build:
        run.say("== build: skipped (" + ("dry run" if run.args.dry_run else "--no-build") + ")")
        return True
    arch = info["capability"]
    env = {**run.env, "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", arch),
           "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4))}
    run.say(f"== build for sm_{arch.replace('.', '')} ({env['MAX_JOBS']} jobs, at most {run.args.build_timeout} s)")
    started = time.monotonic()
    status, output = run_command([sys.executable, "setup.py", "build_ext", "--inplace"], run.args.build_timeout, env,
                                 log=run.files["build.log"])
    run.summary["stages"]["build"] = {"seconds": round(time.monotonic() - started, 1), "status": status}
    if status != 0:
        run.say("\n".join(output.splitlines()[-40:]))
        run.problem(f"build failed ({status}); log: {run.files['build.log'].name}")
        return False
    run.say(f"  built in {time.monotonic() - started:.0f} s")
    return True


def check_extension(run: Run, info: dict) -> bool:
    built = python(run, "import json, kdfast._extension as e\nfrom kdfast import _validation as v\n"
                        "print(json.dumps({'loaded': e.LOADED, 'error': e.LOAD_ERROR, 'info': e.BUILD_INFO, "
                        "'hashes': {f'{f}:{b}': v.current_hash(f, b) for f in v.FAMILIES for b in v.GPU_BACKENDS}}))")
    run.summary["source_hashes"] = built.get("hashes", {})
    if "error" in built and "loaded" not in built:
        run.problem(f"kdfast does not import: {built['error']}")
        return False
    archs = (built.get("info") or {}).get("cuda_archs", "")
    run.say(f"  kdfast._C: {'loaded' if built['loaded'] else 'NOT loaded: ' + str(built['error'])}; "
            f"CUDA archs {archs or 'none'}; sources {(built.get('info') or {}).get('cuda_sources')}")
    if run.args.dry_run:
        return True
    arch = info["capability"].replace(".", "") + "0"
    if not built["loaded"] or arch not in archs.split(","):
        run.problem(f"kdfast._C has no CUDA kernels for sm_{arch[:-1]} (archs: {archs or 'none'}): the build "
                    f"did not compile them; see {run.files['build.log'].name}")
        return False
    return True


def wanted(run: Run, family: str, backend: str) -> bool:
    if not run.args.only:
        return True
    items = [item.strip() for item in run.args.only.split(",") if item.strip()]
    return any(item in (family, backend, f"{family}:{backend}") for item in items)


def smoke(run: Run) -> None:
    listed = subprocess.run([sys.executable, "tests/gpu_smoke.py", "--list"], cwd=ROOT, env=run.env,
                            capture_output=True, text=True, timeout=120).stdout.split()
    cases = [c for c in listed if wanted(run, *c.split(":")[:2])]
    if run.args.dry_run:  # one Triton case per family, interpreted on small shapes
        cases = [next(c for c in cases if c.startswith(f"{f}:triton:")) for f in FAMILIES
                 if any(c.startswith(f"{f}:triton:") for c in cases)]
    # (the dry run's budget leaves room for a loaded CPU: it checks the control flow, not speed)
    budget = min(max(run.args.smoke_budget, 180) if run.args.dry_run else run.args.smoke_budget, max(run.left(), 1))
    run.say(f"== smoke: {len(cases)} kernel paths, one process each (CUDA_LAUNCH_BLOCKING=1), {budget:.0f} s")
    env = {**run.env, "CUDA_LAUNCH_BLOCKING": "1"}
    started = time.monotonic()
    extra = ["--device", "cpu", "--small"] if run.args.dry_run else []

    def one(case):
        timeout = max(5.0, started + budget - time.monotonic())
        status, output = run_command([sys.executable, "tests/gpu_smoke.py", case, *extra], timeout, env)
        lines = [line for line in output.splitlines() if line.startswith('{"case"')]
        if lines:
            return json.loads(lines[-1])
        return {"case": case, "ok": False, "problem": f"exit {status}: " + " | ".join(output.strip().splitlines()[-3:])}

    with concurrent.futures.ThreadPoolExecutor(min(12, os.cpu_count() or 2)) as pool, \
            open(run.files["smoke.jsonl"], "w") as f:
        for result in pool.map(one, cases):
            f.write(json.dumps(result) + "\n")
            run.summary["smoke"].append(result)
            nan = float("nan")
            errors = f"loss {result.get('loss_error', nan):.1e} grad {result.get('grad_error', nan):.1e}"
            run.say(f"  {'ok  ' if result['ok'] else 'FAIL'} {result['case']:48s} {str(result.get('path')):34s} "
                    f"{errors} {result.get('seconds', '')} s" + ("" if result["ok"] else f"  {result.get('problem')}"))
    run.summary["stages"]["smoke"] = {"seconds": round(time.monotonic() - started, 1)}


def junit_counts(path: pathlib.Path) -> dict:
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return counts
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        for key in counts:
            counts[key] += type(counts[key])(float(suite.get(key, 0)))
    return counts


def groups(run: Run) -> list[dict]:
    """The pytest processes in order: core tests per family and backend (CUDA first: no JIT
    compilation), the tests with no backend parameter, the rest, torch.compile last."""
    out = []
    for stage, marker in STAGES:
        for backend in BACKENDS:
            for family in FAMILIES:
                if run.args.dry_run and stage != "core" and family != FAMILIES[0]:
                    continue  # the dry run's later stages: one family shows the control flow
                if wanted(run, family, backend):
                    out.append({"stage": stage, "family": family, "backend": backend, "marker": marker,
                                "files": family_tests(family)})
        if stage == "core" and not run.args.only:
            out.append({"stage": "misc", "family": "auto", "backend": "auto", "marker": "gpu_core or not gpu_core",
                        "files": MISC_TESTS})
    return out


def family_tests(family: str) -> list[str]:
    """A family's test files: tests/test_<family>.py, tests/test_<family>_*.py and those of
    the features built on its kernels (USES)."""
    tests = ROOT / "tests"
    own = [tests / f"test_{family}.py", *sorted(tests.glob(f"test_{family}_*.py"))]
    users = [tests / f"test_{name}.py" for name in USES.get(family, ())]
    return [f"tests/{p.name}" for p in own + users if p.exists()]


def run_group(run: Run, group: dict) -> dict:
    name = f"{group['stage']}-{group['family']}-{group['backend']}"
    xml = run.tmp / f"junit-{name}.xml"
    marker = group["marker"] if run.args.dry_run else f"gpu and ({group['marker']})"
    # -W: a kernel failing kdfast's first-use check (a warning, then a fallback) fails its test.
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--tb=short", "-m", marker,
               "-W", "error:kdfast:RuntimeWarning", f"--junitxml={xml}", *group["files"]]
    if group["backend"] != "auto":
        command.append(f"--kdfast-backend={group['backend']}")
    if run.args.dry_run:
        command.append(f"--kdfast-first={DRY_RUN_FIRST[group['stage']]}")
    result = {**group, "name": name}
    if run.args.dry_run and group["backend"] == "cuda":
        return {**result, "status": "skipped: no GPU", "tests": 0}
    timeout = run.left() - run.args.bench_reserve
    if timeout < 10:
        return {**result, "status": "not run: deadline", "tests": 0}
    started = time.monotonic()
    status, output = run_command(command, timeout, run.env)
    with run.lock, open(run.files["tests.log"], "a") as f:
        f.write(f"\n===== {name}: {' '.join(command[1:])}\n{output}")
    counts = junit_counts(xml)
    if xml.exists():
        result["junit"] = str(xml)
    if status == "timeout":
        outcome = "interrupted"
    elif status == 5 or counts["tests"] == counts["skipped"]:
        outcome = "no tests"
    elif status == 0 and counts["failures"] == counts["errors"] == 0:
        outcome = "passed"
    else:
        outcome = "FAILED"
    tail = [line for line in output.splitlines() if line.strip()][-1:] or [""]
    return {**result, **counts, "status": outcome, "exit": status, "seconds": round(time.monotonic() - started, 1),
            "pytest": tail[0][:200]}


def tests(run: Run) -> None:
    todo = groups(run)
    run.say(f"== tests: {len(todo)} pytest processes, {run.args.workers} at a time, "
            f"{max(run.left() - run.args.bench_reserve, 0):.0f} s left for them")
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(run.args.workers) as pool:
        futures = [pool.submit(run_group, run, group) for group in todo]
        for future in futures:
            result = future.result()
            run.summary["groups"].append(result)
            run.say(f"  {result['status']:16s} {result['name']:32s} {result.get('tests', 0):4d} tests "
                    f"{result.get('failures', 0)} failed {result.get('errors', 0)} errors "
                    f"{result.get('skipped', 0)} skipped {result.get('seconds', 0)} s  {result.get('pytest', '')}")
    run.summary["stages"]["tests"] = {"seconds": round(time.monotonic() - started, 1)}
    merge_junit(run)


def merge_junit(run: Run) -> None:
    merged = ET.Element("testsuites")
    for group in run.summary["groups"]:
        if "junit" not in group:
            continue
        try:
            root = ET.parse(group["junit"]).getroot()
        except ET.ParseError:
            continue
        for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
            suite.set("name", group["name"])
            merged.append(suite)
    ET.ElementTree(merged).write(run.files["junit.xml"], encoding="unicode")


def records(run: Run) -> None:
    """A record per family and backend whose groups all passed (every test of the family)."""
    info = run.summary.get("environment", {})
    hashes = run.summary.get("source_hashes", {})
    _validation = load_validation()

    existing = _validation.load(_validation.RECORD)
    updated = list(existing)
    for family in FAMILIES:
        for backend in BACKENDS:
            mine = [g for g in run.summary["groups"] if (g["family"], g["backend"]) == (family, backend)]
            if not mine or any(g["status"] not in ("passed", "no tests") for g in mine) or \
                    not any(g["status"] == "passed" for g in mine):
                continue
            source = hashes.get(f"{family}:{backend}")
            if not source:
                run.problem(f"no source hash for {family} {backend} (not built?)")
                continue
            record = {"family": family, "backend": backend,
                      "gpu": info.get("gpu") or "none (dry run, Triton interpreted on the CPU)",
                      "capability": info.get("capability") or "none", "sources": source,
                      "commit": os.environ.get("KDFAST_COMMIT") or git_commit(),
                      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "tests": sum(g.get("tests", 0) - g.get("skipped", 0) for g in mine),
                      "torch": info.get("torch"), "triton": info.get("triton")}
            updated = _validation.merge(updated, record)
            run.summary["records"].append(record)
    _validation.write(updated, run.files["validation.json"])
    if run.summary["records"] and not run.args.dry_run:
        _validation.write(updated, _validation.RECORD)  # the checkout's record, to commit
    written = ", ".join(f"{r['family']}:{r['backend']}" for r in run.summary["records"]) or "none"
    run.say(f"== validation record: {written} -> {run.files['validation.json'].name}")


def load_validation():
    """kdfast/_validation.py on its own (the standard library only: no torch in this process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kdfast_validation", ROOT / "kdfast" / "_validation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def bench(run: Run) -> None:
    if run.args.no_bench:
        run.say("== benchmarks: skipped (--no-bench)")
        return
    budget = run.left() if not run.args.dry_run else min(run.left(), 5)
    families = [f for f in FAMILIES if wanted(run, f, "cuda") or wanted(run, f, "triton")]
    families += [name for f in families for name in USES.get(f, ())]
    gpu = (run.summary.get("environment", {}).get("gpu") or "cpu").replace(" ", "-").lower()
    results = run.out / f"{gpu}_{run.stamp}.jsonl"
    run.files["bench"] = results
    if budget < 15 and not run.args.dry_run:
        run.say(f"== benchmarks: not run ({budget:.0f} s left)")
        return
    run.say(f"== benchmarks: {' '.join(families)} ({budget:.0f} s)")
    command = [sys.executable, "-m", "kdfast.bench", *families, "--no-sweep", "--out", str(results)]
    if run.args.dry_run:
        command += ["--quick", "--device", "cpu"]
    started = time.monotonic()
    status, output = run_command(command, budget, run.env)
    for line in output.splitlines():
        if line.strip() and not line.startswith("W"):
            run.say("  " + line)
    lines = results.read_text().splitlines() if results.exists() else []
    run.summary["bench"] = {"status": "interrupted" if status == "timeout" else status, "records": len(lines),
                            "seconds": round(time.monotonic() - started, 1), "file": results.name}


def table(run: Run) -> None:
    s = run.summary
    lines = ["", "=" * 100, f"gpu-check {'(dry run) ' if run.args.dry_run else ''}on "
             f"{s.get('environment', {}).get('gpu') or 'no GPU'}: {run.elapsed():.0f} s"]
    if s["smoke"]:
        failed = [r["case"] for r in s["smoke"] if not r["ok"]]
        lines.append(f"smoke: {len(s['smoke']) - len(failed)}/{len(s['smoke'])} kernel paths ok"
                     + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    lines.append(f"{'stage':8s} {'family':11s} {'backend':8s} {'status':16s} {'tests':>6s} {'failed':>6s} "
                 f"{'errors':>6s} {'skipped':>7s} {'seconds':>8s}")
    for g in s["groups"]:
        lines.append(f"{g['stage']:8s} {g['family']:11s} {g['backend']:8s} {g['status']:16s} {g.get('tests', 0):6d} "
                     f"{g.get('failures', 0):6d} {g.get('errors', 0):6d} {g.get('skipped', 0):7d} "
                     f"{g.get('seconds', 0):8}")
    lines.append("records: " + (", ".join(f"{r['family']}:{r['backend']}" for r in s["records"]) or "none"))
    if s["bench"]:
        lines.append(f"benchmarks: {s['bench']['records']} records ({s['bench']['status']}) -> {s['bench']['file']}")
    for problem in s["problems"]:
        lines.append(f"problem: {problem}")
    lines.append(f"files in {run.out}: " + ", ".join(sorted(p.name for p in run.files.values() if p.exists())))
    lines.append("RESULT: " + ("PASSED" if ok(run) else "FAILED"))
    run.say("\n".join(lines))


def ok(run: Run) -> bool:
    s = run.summary
    return (not s["problems"] and all(r["ok"] for r in s["smoke"])
            and all(g["status"] in ("passed", "no tests", "skipped: no GPU") for g in s["groups"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for the files (default: $OUT, else bench/results)")
    parser.add_argument("--only", default=os.environ.get("ONLY", ""),
                        help="families and/or backends, e.g. softmax_kl,attention or relational:cuda")
    parser.add_argument("--deadline", type=float, default=float(os.environ.get("DEADLINE", 400)),
                        help="seconds for the whole run, build included (default 400)")
    parser.add_argument("--build-timeout", type=float, default=240)
    parser.add_argument("--smoke-budget", type=float, default=30)
    parser.add_argument("--bench-reserve", type=float, default=60, help="seconds kept for the benchmarks")
    parser.add_argument("--workers", type=int, default=min(4, max(1, (os.cpu_count() or 2) // 4)),
                        help="test processes at a time")
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--no-bench", action="store_true", default=os.environ.get("BENCH", "1") == "0")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU: Triton interpreted, a few tests per group, no build, no GPU records")
    args = parser.parse_args(argv)
    run = Run(args)
    try:
        info = preflight(run)
        if info and build(run, info) and check_extension(run, info):
            smoke(run)
            tests(run)
            records(run)
            bench(run)
    except KeyboardInterrupt:
        run.problem("interrupted")
    finally:
        run.summary["seconds"] = round(run.elapsed(), 1)
        run.files["summary.json"].write_text(json.dumps(run.summary, indent=1, default=str) + "\n")
        table(run)
        shutil.rmtree(run.tmp, ignore_errors=True)
    return 0 if ok(run) else 1


if __name__ == "__main__":
    sys.exit(main())
