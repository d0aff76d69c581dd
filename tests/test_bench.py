"""kdfast bench as a feature: it runs from an installed kdfast (nothing from the checkout),
measures the copy bandwidth, sweeps sizes and plots them; the families declare what the
default run must hold. Nothing here times kdfast: benchmarks are not tests."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from kdfast.bench import attention, relational, softmax_kl
from kdfast.bench import run as bench_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A family of one cheap case with a floor and a two-size sweep, run through the real CLI.
TINY_RUN = textwrap.dedent('''
    import sys, types
    import torch
    import kdfast
    from kdfast.bench import run
    from kdfast.bench.harness import Case, Floor

    def provider(n, factor):
        def build():
            x = torch.randn(n, requires_grad=True)
            return lambda: (x * factor).sum().backward()
        return build

    def case(n, sweep=None):
        return Case("tiny", {"N": n}, torch.float32, "cpu", {"a": provider(n, 2.0), "b": provider(n, 3.0)},
                    min_bytes=8 * n, sweep=sweep, floors=[] if sweep else [Floor("a", "b", 0.01)])

    tiny = types.ModuleType("kdfast.bench.tiny")
    tiny.cases = lambda device, quick: [case(1024)]
    tiny.sweep = lambda device, quick: [case(1024, "N"), case(4096, "N")]
    sys.modules["kdfast.bench.tiny"] = tiny
    run.FAMILIES.append("tiny")
    code = run.main(["tiny", "--quick", "--plot", "--device", "cpu"])
    checkout = sys.argv[1]
    installed = (sys.prefix + "/", sys.base_prefix + "/")  # the venv may live inside the checkout (CI)
    outside = [m.__file__ for m in list(sys.modules.values())
               if getattr(m, "__file__", None) and m.__file__.startswith(checkout + "/")
               and not m.__file__.startswith(installed)]
    print("KDFAST", kdfast.__file__)
    print("FROM_CHECKOUT", outside)
    sys.exit(code)
''')


def test_bench_runs_from_an_installed_kdfast(tmp_path):
    """The package copied alone (as pip installs it), run from a folder without bench/."""
    pytest.importorskip("matplotlib")
    site = tmp_path / "site"
    shutil.copytree(os.path.join(ROOT, "kdfast"), site / "kdfast", ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("OUT", None)
    out = subprocess.run([sys.executable, "-c", TINY_RUN, ROOT], cwd=work, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert f"KDFAST {site / 'kdfast' / '__init__.py'}" in out.stdout
    assert "FROM_CHECKOUT []" in out.stdout
    (results,) = work.glob("cpu_*.jsonl")  # no bench/results here: the current directory
    records = [json.loads(line) for line in results.read_text().splitlines()]
    (copy,) = [r for r in records if r["kind"] == "copy"]
    assert copy["copy_gbps"] > 0
    timings = [r for r in records if r["kind"] == "timing"]
    assert len(timings) == 6 and all("error" not in r for r in timings)
    for r in timings:
        assert r["copy_gbps"] == copy["copy_gbps"]
        assert r["copy_fraction"] == pytest.approx(r["effective_gbps"] / copy["copy_gbps"])
        assert r["effective_gbps"] == pytest.approx(8 * r["shape"]["N"] / (r["median_ms"] * 1e-3) / 1e9)
    assert sorted(r["shape"]["N"] for r in timings if r.get("sweep") == "N") == [1024, 1024, 4096, 4096]
    assert [r["kind"] for r in records].count("ratio") == 1  # the floor's record
    assert (work / f"{results.stem}_tiny.png").stat().st_size > 10_000
    assert f"{results.stem}_tiny.png\n" in out.stdout.split("plot -> ", 1)[1]


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = tmp_path / "cpu.jsonl"
    path.write_text("")
    assert bench_run.main(["--plot", "--from", str(path)]) == 2
    assert "kdfast bench --plot needs matplotlib" in capsys.readouterr().out


def test_the_default_run_sweeps_sizes_and_keeps_the_floors():
    """What `kdfast bench` runs on a CPU: the cases with floors (their records are the
    README's figures) and sweeps (softmax-KL's V from 1k to 256k, batch sizes for the maps
    and the embeddings), each declaring its memory traffic."""
    cpu = [(m, m.cases("cpu", False), m.sweep("cpu", False)) for m in (softmax_kl, attention, relational)]
    for module, cases, sweep in cpu:
        assert any(case.floors for case in cases), module.__name__
        assert all(case.sweep and case.min_bytes and not case.floors for case in sweep), module.__name__
        assert len({case.shape[case.sweep] for case in sweep}) >= 5
    kl_sweep = softmax_kl.sweep("cpu", False)
    assert [c.shape["V"] for c in kl_sweep] == [2**k for k in range(10, 19)]
    assert {"kdfast-cpu", "fasterai-eager", "torch-compile"} <= set(kl_sweep[0].providers)
    if torch.cuda.is_available():
        assert softmax_kl.sweep("cuda", False)[-1].shape["V"] == 2**18


def test_attention_traffic_counts_the_passes():
    """The CPU attention case counts what a forward and a backward run as two passes must move
    (f_s read by each, f_t read, grad_f_s written: 84 MB at B = 64, 256/512 channels, 16x16);
    the GPU floor counts one pass over f_s."""
    (case, _), gpu = attention.cases("cpu", False), attention._min_bytes(64, [(256, 512, 16)], 4)
    assert case.min_bytes == 64 * (3 * 256 + 512) * 16 * 16 * 4 == 83_886_080
    assert gpu == 64 * (2 * 256 + 512) * 16 * 16 * 4


def test_steadiness_compares_each_series_with_its_own_median():
    """p90 against the median of its own series (a slow mode is calls several times slower
    than their neighbours); a series uniformly slower after a temporary (inputs no longer
    in cache) is recorded as interleaved_vs_alone, not failed."""
    from kdfast.bench.harness import Case, Steadiness, steadiness_records

    def series(median, p90):
        return {"median_ms": median, "p90_ms": p90, "page_faults_per_call": 0}

    case = Case("probe", {"n": 1}, torch.float32, "cpu", {}, steadiness=Steadiness(["p"], 1 << 20))
    for interleaved, met in ((series(4.0, 4.4), True), (series(4.0, 5.2), False)):
        measured = {"p": {"first_ms": 9.0, "steadiness": {"alone": series(2.0, 2.1), "interleaved": interleaved,
                                                          "temporary_mb": 1.0}}}
        (record,) = steadiness_records(case, {}, measured)
        assert record["interleaved_vs_alone"] == 2.0 and record["met"] is met
        assert record["interleaved_p90_ratio"] == pytest.approx(interleaved["p90_ms"] / 4.0)
    slow_alone = {"p": {"first_ms": 9.0, "steadiness": {"alone": series(2.0, 2.6), "interleaved": series(2.0, 2.1),
                                                        "temporary_mb": 1.0}}}
    assert steadiness_records(case, {}, slow_alone)[0]["met"] is False
