"""`make gpu-check` (tests/gpu_check.py) tested before its runs on a GPU: a dry run drives its
whole control flow on the CPU (Triton interpreted, a few tests per group), and its pieces
are checked on their own."""
import argparse
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import gpu_check  # noqa: E402

pytest.importorskip("triton")


def args(**overrides):
    defaults = dict(out=None, only="", deadline=100.0, build_timeout=10.0, smoke_budget=30.0, bench_reserve=10.0,
                    workers=2, no_build=False, no_bench=False, dry_run=True)
    return argparse.Namespace(**{**defaults, **overrides})


def test_dry_run_drives_every_stage(tmp_path):
    record = (ROOT / "kdfast" / "validation.json").read_bytes() if (ROOT / "kdfast" / "validation.json").exists() \
        else None
    result = subprocess.run([sys.executable, "tests/gpu_check.py", "--dry-run", "--out", str(tmp_path),
                             "--deadline", "400", "--workers", "2", "--bench-reserve", "10"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert result.stdout.rstrip().splitlines()[-1] == "RESULT: PASSED"  # the table comes last
    files = list(tmp_path.iterdir())
    assert 6 <= len(files) <= 8 and all(f.is_file() for f in files), files
    summary = json.loads(next(f for f in files if f.name.endswith("summary.json")).read_text())
    assert summary["dry_run"] and not summary["problems"]
    smoke_file = next(f for f in files if f.name.endswith("smoke.jsonl"))
    smoke = [json.loads(line) for line in smoke_file.read_text().splitlines()]
    assert {(r["family"], r["backend"], r["ok"]) for r in smoke} == {(f, "triton", True) for f in gpu_check.FAMILIES}
    status = {(g["stage"], g["family"], g["backend"]): g for g in summary["groups"]}
    for family in gpu_check.FAMILIES:
        assert status["core", family, "triton"]["status"] == "passed"
        assert status["core", family, "triton"]["tests"] == 2
        assert status["core", family, "cuda"]["status"] == "skipped: no GPU"
    assert status["rest", "softmax_kl", "triton"]["status"] == "passed"
    assert status["compile", "softmax_kl", "triton"]["status"] == "no tests"
    assert status["misc", "auto", "auto"]["status"] == "passed"
    junit = next(f for f in files if f.name.endswith("junit.xml")).read_text()
    assert junit.count("<testsuite ") >= 5
    records = json.loads((tmp_path / "validation.json").read_text())["records"]
    assert {(r["family"], r["backend"]) for r in records} >= {(f, "triton") for f in gpu_check.FAMILIES}
    assert all(r["capability"] == "none" for r in records if r["gpu"].startswith("none (dry run"))
    assert summary["bench"] is not None
    after = (ROOT / "kdfast" / "validation.json").read_bytes() if (ROOT / "kdfast" / "validation.json").exists() \
        else None
    assert after == record  # a dry run never touches the committed record


def test_child_processes_cannot_import_what_the_gpu_machine_lacks(tmp_path):
    run = gpu_check.Run(args(out=str(tmp_path)))
    for name in gpu_check.FORBIDDEN:
        result = subprocess.run([sys.executable, "-c", f"import {name}"], env=run.env, capture_output=True, text=True)
        assert result.returncode != 0 and f"No module named '{name}'" in result.stderr, name
        code = f"import importlib.util; print(importlib.util.find_spec('{name}'))"
        found = subprocess.run([sys.executable, "-c", code], env=run.env, capture_output=True, text=True)
        assert found.stdout.strip() == "None", name  # as if not installed (torch._dynamo asks so)
    ok = subprocess.run([sys.executable, "-c", "import torch, triton, kdfast"], env=run.env, capture_output=True)
    shutil.rmtree(run.tmp)
    assert ok.returncode == 0, ok.stderr


def test_only_selects_families_and_backends(tmp_path):
    run = gpu_check.Run(args(out=str(tmp_path), only="softmax_kl,relational:cuda", dry_run=False))
    names = [g["stage"] + " " + g["family"] + " " + g["backend"] for g in gpu_check.groups(run)]
    shutil.rmtree(run.tmp)
    assert names == ["core softmax_kl cuda", "core relational cuda", "core softmax_kl triton",
                     "rest softmax_kl cuda", "rest relational cuda", "rest softmax_kl triton",
                     "compile softmax_kl cuda", "compile relational cuda", "compile softmax_kl triton"]


def test_interrupted_pytest_still_reports(tmp_path):
    """At the deadline pytest gets SIGINT and still writes its summary."""
    test = tmp_path / "test_slow.py"
    test.write_text("import time\n\ndef test_fast():\n    pass\n\ndef test_slow():\n    time.sleep(60)\n")
    xml = tmp_path / "junit.xml"
    status, output = gpu_check.run_command([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                            f"--junitxml={xml}", str(test)], 8, cwd=tmp_path)
    assert status == "timeout"
    assert "KeyboardInterrupt" in output and "1 passed" in output
    assert gpu_check.junit_counts(xml)["tests"] >= 1
