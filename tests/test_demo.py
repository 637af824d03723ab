"""`icl demo --quick` end to end (the README's main job, shortened), and its
failure modes."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("nilearn", reason="the demo extra (pip install nilearn) is part of the README install")


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "icl", "demo", "--quick", "--out", str(out), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_quick_demo_writes_report_with_numbers(demo_out):
    out, stdout = demo_out
    for rel in ("metrics.json", "report.md", "figures/curves.png", "figures/overlay.png", "data/meta.json"):
        assert (out / rel).is_file(), rel
    m = json.loads((out / "metrics.json").read_text())
    for method in ("supervised", "fixmatch", "icl"):
        scores = m["summary"][method]["test"]
        assert 0.0 <= scores["dice_mean"] <= 1.0
        assert math.isfinite(scores["hd95_mean"])
        assert "dice_t1" in scores or "dice_other" in scores
    for run in m["runs"]:
        assert run["iterations"] == m["settings"]["iterations"] and run["it_per_s"] > 0
    report = (out / "report.md").read_text()
    assert "ICL" in report and "supervised only" in report and "FixMatch" in report
    assert "figures/overlay.png" in report
    icl_dice = m["summary"]["icl"]["test"]["dice_mean"]
    assert f"{icl_dice:.4f}" in report  # the table shows the measured number
    assert "report:" in stdout and "test subjects" in stdout


def test_demo_population_is_reused_and_splits_are_disjoint(demo_out):
    out, _ = demo_out
    meta = json.loads((out / "data" / "meta.json").read_text())
    lists = {k: (out / "data" / f"{k}.list").read_text().split() for k in ("train", "val", "test")}
    assert not (set(lists["train"]) & set(lists["val"])) and not (set(lists["train"]) & set(lists["test"]))
    assert not (set(lists["val"]) & set(lists["test"]))
    assert set(meta["test_contrast"]) == set(lists["test"])
    from icl.demo import population

    logs = []
    spec = population.PopulationSpec(**{k: (tuple(v) if k == "noise" else v)
                                        for k, v in meta["params"].items() if k != "version"})
    population.build_population(str(out / "data"), spec, log=logs.append)
    assert logs and "reusing" in logs[0]


def test_demo_missing_dependency_is_one_line(monkeypatch, tmp_path, capsys):
    from icl import cli
    from icl.demo import template

    def missing():
        raise template.MissingDemoDependency("the demo needs nilearn and nibabel; install them with: pip install nilearn nibabel")

    monkeypatch.setattr(template, "template_dir", missing)
    code = cli.main(["demo", "--out", str(tmp_path / "d"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "pip install nilearn" in err


def test_demo_bad_arguments(tmp_path, capsys):
    from icl import cli

    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--peer", "bogus"]) == 2
    assert "--peer" in capsys.readouterr().err
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--labeled-slices", "0"]) == 2
    assert "--labeled-slices" in capsys.readouterr().err
    for opt in ("--jobs", "--threads"):
        assert cli.main(["demo", "--out", str(tmp_path / "d"), opt, "0"]) == 2
        assert opt in capsys.readouterr().err


def test_plan_jobs_shares_the_usable_cores(monkeypatch):
    from icl.demo import run

    monkeypatch.setattr(run, "usable_cores", lambda: 2)
    assert run.plan_jobs(3, gpu=False) == (2, 1)  # the README's 2-core machine: two one-thread runs
    assert run.plan_jobs(1, gpu=False) == (1, 2)  # never more runs at a time than runs
    assert run.plan_jobs(3, gpu=True) == (1, 2)
    assert run.plan_jobs(4, gpu=False, jobs=1) == (1, 2)
    assert run.plan_jobs(4, gpu=False, jobs=8) == (4, 1)
    assert run.plan_jobs(4, gpu=False, jobs=2, threads=3) == (2, 3)
    monkeypatch.setattr(run, "usable_cores", lambda: 16)
    assert run.plan_jobs(3, gpu=False) == (3, 5)
    with pytest.raises(ValueError, match="--jobs"):
        run.plan_jobs(3, gpu=False, jobs=0)


def test_parallel_runs_equal_sequential_runs(demo_out, tmp_path):
    """Runs in worker processes give the numbers of the same runs one after another
    (same threads): nothing is shared between them but the population."""
    out, _ = demo_out
    scores = {}
    for jobs in (1, 2):
        dest = tmp_path / f"jobs{jobs}"
        proc = subprocess.run([sys.executable, "-m", "icl", "demo", "--quick", "--out", str(dest), "--data-dir",
                               str(out / "data"), "--peer", "none", "--iterations", "6", "--jobs", str(jobs),
                               "--threads", "1", "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        m = json.loads((dest / "metrics.json").read_text())
        assert m["jobs"] == jobs and m["torch_threads"] == 1
        scores[jobs] = {r["method"]: r["test"] for r in m["runs"]}
    assert set(scores[1]) == {"supervised", "icl"}
    assert scores[1] == scores[2]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine where --backend cuda fails")
def test_a_failing_parallel_run_is_a_one_line_usage_error(demo_out, tmp_path):
    out, _ = demo_out
    proc = subprocess.run([sys.executable, "-m", "icl", "demo", "--quick", "--out", str(tmp_path / "d"),
                           "--data-dir", str(out / "data"), "--backend", "cuda", "--jobs", "2", "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "seed 0" in err[0] and "--backend cuda" in err[0] and "stdout.log" in err[0]
