"""`icl demo --quick` end to end (the README's main job, shortened), and its
failure modes."""
import json
import math
import os
import subprocess
import sys

import numpy as np
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
    for rel in ("metrics.json", "report.md", "figures/curves.png", "figures/overlay_corrupted.png",
                "figures/overlay_clean.png", "data/meta.json"):
        assert (out / rel).is_file(), rel
    m = json.loads((out / "metrics.json").read_text())
    for method in ("threshold", "supervised", "icl"):
        for split in ("test", "test_corrupted"):
            scores = m["summary"][method][split]
            assert 0.0 <= scores["dice_mean"] <= 1.0
            assert math.isfinite(scores["hd95_mean"])
    for run in m["runs"]:
        assert run["iterations"] == m["settings"]["iterations"] and run["it_per_s"] > 0
    report = (out / "report.md").read_text()
    assert "ICL" in report and "supervised only" in report and "two-threshold rule" in report
    assert "figures/overlay_corrupted.png" in report
    icl_dice = m["summary"]["icl"]["test_corrupted"]["dice_mean"]
    assert f"{icl_dice:.4f}" in report  # the table shows the measured number
    assert "report:" in stdout and "corrupted test slices" in stdout


def test_demo_data_is_leak_free_and_reused(demo_out, tmp_path):
    out, _ = demo_out
    meta = json.loads((out / "data" / "meta.json").read_text())
    slabs = meta["slabs"]
    seen = {}
    for s in slabs:
        for z in s["z"]:
            assert z not in seen, "a slice belongs to two slabs"
            seen[z] = s["split"]
    # neighbouring slabs are separated by a gap: no slice of one split touches another split's slice
    for a, b in zip(slabs, slabs[1:]):
        assert min(b["z"]) - max(a["z"]) > meta["params"]["gap"]
    assert meta["counts"]["test"] == meta["counts"]["test_corrupted"] >= 1
    from icl.demo import brain

    logs = []
    brain.build(str(out / "data"), log=logs.append)
    assert logs and "reusing" in logs[0]
    clean = brain.load_split(str(out / "data"), "test")
    bad = brain.load_split(str(out / "data"), "test_corrupted")
    for (_, img, lab), (_, img_bad, lab_bad) in zip(clean, bad):
        assert np.array_equal(lab, lab_bad) and not np.allclose(img, img_bad)


def test_demo_missing_dependency_is_one_line(monkeypatch, tmp_path, capsys):
    from icl import cli
    from icl.demo import brain

    def missing():
        raise brain.MissingDemoDependency("the demo needs nilearn and nibabel; install them with: pip install nilearn nibabel")

    monkeypatch.setattr(brain, "template_dir", missing)
    code = cli.main(["demo", "--out", str(tmp_path / "d"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "pip install nilearn" in err


def test_demo_bad_arguments(tmp_path, capsys):
    from icl import cli

    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err
