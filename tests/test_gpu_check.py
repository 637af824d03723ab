"""benches/gpu_check.sh: the plan it would run on a GPU machine, checked here without one."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from benches import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_prints_a_complete_plan(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # as on a GPU machine; collection must not need it
    proc = subprocess.run(["bash", os.path.join(ROOT, "benches", "gpu_check.sh"), str(out), "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    text = proc.stdout
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not out.exists(), "a dry run must not write anything"
    # the build: against the installed torch, offline, for one architecture
    build = next(ln for ln in text.splitlines() if "pip install" in ln)
    for part in ("--no-build-isolation", "--no-deps", "--no-index", "-e .", "TORCH_CUDA_ARCH_LIST="):
        assert part in build, build
    arch = build.split("TORCH_CUDA_ARCH_LIST=")[1].split()[0]
    assert ";" not in arch and arch.count(".") == 1, f"one architecture only, got {arch!r}"
    # the tests: build tests and the GPU-marked tests of the kernel files, with durations
    assert "-m gpu" in text and "--durations" in text
    ids = [ln.strip() for ln in text.splitlines() if ln.startswith("    tests/")]
    files = {i.split("::")[0] for i in ids}
    assert {"tests/test_build.py", "tests/test_gpu_proxy_attention.py", "tests/test_triton_proxy_attention.py",
            "tests/test_prototype_update.py"} <= files, files
    assert any("test_gpu_dtypes" in i for i in ids) and any("test_gpu_matches_reference" in i for i in ids)
    assert not any("test_direct_matches_oracle" in i for i in ids), "interpreter-only tests selected"
    # the benchmarks: both dtypes, the headline shapes, CSV and plots under OUTDIR
    for dtype in ("float32", "bfloat16"):
        assert f"--dtype {dtype}" in text
    assert f"--csv {out}/proxy_attention.csv" in text and f"--plot {out}/plots" in text
    for shape in ("set=acdc2d-all-levels;B=8;K=4", "set=amos3d;B=2;N=216;C=256;H=16;K=16",
                  "set=sweep;sweep=1;B=2;N=1048576;C=64;H=4;K=4"):
        assert f"    {shape}" in text, shape
    assert "published-compile" in text and "icl-cuda" in text and "icl-triton" in text
    # the training steps: benches.train_step on the GPU, rows under OUTDIR, each measurement listed
    assert f"--csv {out}/train_step.csv" in text and "-m benches.train_step --device cuda" in text
    listed = {tuple(x.strip() for x in ln.split("|")) for ln in text.splitlines() if ln.startswith("    cfg=")}
    d2, d3 = "cfg=acdc2d;B=8+8;patch=256x256;K=4", "cfg=brats3d;B=2+2;patch=96x96x96;K=2"
    for prov in ("published-formulation", "faithful-fused", "icl-default"):
        for dtype in ("float32", "bfloat16"):
            assert (d2, prov, dtype, "eager") in listed and (d3, prov, dtype, "eager") in listed, (prov, dtype)
        for mode in ("compile-default", "compile-reduce-overhead"):
            assert (d2, prov, "bfloat16", mode) in listed, (prov, mode)
    order = [ln.split()[1] for ln in text.splitlines() if ln.startswith("step ") and "(limit" in ln]
    assert order.index("train-step-2d-eager") < order.index("train-step-2d-compile-default") \
        < order.index("train-step-2d-compile-reduce-overhead") < order.index("train-step-3d-eager"), order


def test_quick_plan_is_smaller():
    full = gpu_check.plan("/o", quick=False, build=True, arch="9.0")
    quick = gpu_check.plan("/o", quick=True, build=True, arch="9.0")
    assert sum(s.timeout_s for s in quick) < sum(s.timeout_s for s in full)
    q = {s.name: s for s in quick}
    assert "gpu and not slow" in q["tests-gpu"].argv
    assert not any("published-compile" in " ".join(s.argv) for s in quick)
    assert all(s.env.get("TORCH_CUDA_ARCH_LIST") == "9.0" for s in quick if s.name == "build")
    assert [s.name for s in gpu_check.plan("/o", quick=True, build=False, arch="9.0")][0] == "tests-build"
    assert gpu_check.benchmark_shapes(quick=True) == ["set=acdc2d-all-levels;B=8;K=4"]


D2 = "cfg=acdc2d;B=8+8;patch=256x256;K=4"
D3 = "cfg=brats3d;B=2+2;patch=96x96x96;K=2"
PROVS = ("published-formulation", "faithful-fused", "icl-default")


@pytest.mark.parametrize("quick", [True, False])
def test_plan_measures_training(quick):
    """The plan's training steps, parsed by benches.train_step's own parser: the paper's 2D
    shape eager in float32 and bf16 for the three providers (quick: only that); the full
    plan also compiles them (default and reduce-overhead, bf16) and runs the 3D shape eager."""
    steps = gpu_check.plan("/o", quick=quick, build=True, arch="9.0")
    train = [s for s in steps if gpu_check.is_train_step(s)]
    got = [m for s in train for m in gpu_check.train_matrix(s)]
    assert len(got) == len(set(got)), "a measurement planned twice"
    eager2d = {(D2, p, d, "eager") for p in PROVS for d in ("float32", "bfloat16")}
    assert eager2d <= set(got)
    assert all(s.argv[s.argv.index("--device") + 1] == "cuda" and "/o/train_step.csv" in s.argv for s in train)
    if quick:
        assert set(got) == eager2d and sum(s.timeout_s for s in train) <= 45
        return
    compiled = {(D2, p, "bfloat16", m) for p in PROVS for m in ("compile-default", "compile-reduce-overhead")}
    eager3d = {(D3, p, d, "eager") for p in PROVS for d in ("float32", "bfloat16")}
    assert set(got) == eager2d | compiled | eager3d
    assert set(gpu_check.required_training(False)) == set(got)
    # priorities: 2D eager, then 2D compiled, then 3D; every training step before the float32 kernels
    names = [s.name for s in steps]
    firsts = [min(i for i, s in enumerate(steps) if gpu_check.is_train_step(s) and m in gpu_check.train_matrix(s))
              for m in [(D2, PROVS[0], "float32", "eager"), (D2, PROVS[0], "bfloat16", "compile-default"),
                        (D3, PROVS[0], "float32", "eager")]]
    assert firsts == sorted(firsts) and len(set(firsts)) == 3
    assert max(i for i, s in enumerate(steps) if gpu_check.is_train_step(s)) < names.index("bench-proxy-attention-float32")
    # the expected times of the steps up to the compiled 2D rows fit the budget
    upto = names.index("train-step-2d-compile-reduce-overhead")
    assert sum(min(s.expect_s, s.timeout_s) for s in steps[:upto + 1]) <= gpu_check.BUDGET_S["full"]


def test_dry_run_refuses_a_plan_without_the_training_steps(monkeypatch, capsys):
    real = gpu_check.plan
    monkeypatch.setattr(gpu_check, "collect_tests", lambda step: ["tests/x.py::t"])
    monkeypatch.setattr(gpu_check, "plan", lambda *a, **k: [s for s in real(*a, **k) if s.name != "train-step-3d-eager"])
    assert gpu_check.main(["/tmp/never-written", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "lacks training measurements" in err and D3 in err and D2 not in err
    monkeypatch.setattr(gpu_check, "plan", real)
    assert gpu_check.main(["/tmp/never-written", "--dry-run", "--quick"]) == 0


def test_only_selects_steps_and_names_them_when_nothing_matches(capsys):
    steps = gpu_check.plan("/o", quick=False, build=True, arch="9.0")
    assert [s.name for s in gpu_check.select_steps(steps, "train-step-2d")] == [
        "train-step-2d-eager", "train-step-2d-compile-default", "train-step-2d-compile-reduce-overhead"]
    assert gpu_check.select_steps(steps, None) == steps
    with pytest.raises(ValueError, match="matches no step.*train-step-3d-eager"):
        gpu_check.select_steps(steps, "trian")
    assert gpu_check.main(["/tmp/never-written", "--dry-run", "--only", "nothing"]) == 2
    assert "--only 'nothing': matches no step" in capsys.readouterr().err


def test_summary_has_the_training_table(tmp_path):
    """summary.md lists every planned training measurement: ms/iter, peak memory, the
    speed-up over the published formulation and over eager, the status of failed or
    missing rows; rows of an earlier run in the same CSV are left out."""
    import csv as _csv

    from benches.common import COLUMNS

    step = gpu_check.Step("train-step-2d", gpu_check.train_argv(str(tmp_path), ["acdc2d"], list(PROVS), ["bf16"],
                                                                 ["none", "default"], True), "t.txt", 60)
    now, old = "2030-01-01T00:00:10+00:00", "2020-01-01T00:00:00+00:00"

    def row(prov, mode, metric, unit, p50="", shape=D2, ts=now):
        r = dict.fromkeys(COLUMNS, "")
        r.update(op="train_step", provider=prov, mode=mode, shape=shape, dtype="bfloat16", metric=metric, unit=unit,
                 p50=p50, p20=p50, p80=p50, device="H200", timestamp=ts)
        return r

    rows = [row("published-formulation", "eager", "time", "ms", "40"),
            row("published-formulation", "eager", "peak_memory", "MiB", "15000"),
            row("faithful-fused", "eager", "time", "ms", "50"),
            row("faithful-fused", "eager", "time", "ms", "1", ts=old),  # an earlier run: ignored
            row("icl-default", "eager", "time", "ms", "20"),
            row("icl-default", "eager", "time", "ms", "5", shape=D2 + ";part=backbone"),
            row("published-formulation", "compile-default", "time", "ms", "32"),
            row("published-formulation", "compile-default", "first_step", "s", "61.5"),
            row("published-formulation", "compile-default", "compiled", "info: dynamo captured 1 graph(s), 0 graph break(s)"),
            row("icl-default", "compile-default", "time", "error: torch.compile(mode=default) failed: X: y")]
    with open(tmp_path / "train_step.csv", "w", newline="") as fh:
        w = _csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    import datetime as dt

    res = {"name": step.name, "rc": 0, "seconds": 50.0, "log": "t.txt", "tail": "6 measurement(s)",
           "required": False, "text": ""}
    path = gpu_check.write_summary(str(tmp_path), {"name": "NVIDIA H200", "slug": "h", "arch": "9.0"}, [res], False,
                                   60.0, steps=[step], since=dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc))
    text = open(path).read()
    lines = {ln.split("|")[4].strip() + "/" + ln.split("|")[3].strip(): ln for ln in text.splitlines()
             if ln.startswith("| acdc2d |")}
    assert "| 40.00 | 15000 |" in lines["published-formulation/eager"]
    assert "| 50.00 |" in lines["faithful-fused/eager"] and "| 0.80x |" in lines["faithful-fused/eager"]
    assert "| 2.00x |" in lines["icl-default/eager"]
    assert "| 32.00 |" in lines["published-formulation/compile-default"] and "| 61.5 |" in lines[
        "published-formulation/compile-default"] and "| 1.25x |" in lines["published-formulation/compile-default"]
    assert "| ok; dynamo captured 1 graph(s), 0 graph break(s) |" in lines["published-formulation/compile-default"]
    assert "error: torch.compile(mode=default) failed" in lines["icl-default/compile-default"]
    assert "not measured" in lines["faithful-fused/compile-default"]
    assert "Eager breakdown" in text and "| acdc2d | bfloat16 | icl-default | 20.00 | 5.00 |" in text


def test_without_a_gpu_a_real_run_refuses(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "gpu_info", lambda: {"name": None, "slug": None, "arch": None})
    assert gpu_check.main(["/tmp/never-written", "--quick"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not os.path.exists("/tmp/never-written")


def test_steps_run_within_the_budget_and_the_summary_says_what_failed(tmp_path):
    py = sys.executable
    steps = [
        gpu_check.Step("tests-gpu", [py, "-c", "print('3 passed, 1 skipped in 0.1s')"], "a.log", 30, required=True),
        gpu_check.Step("bench-proxy-attention-float32", [py, "-c", "import time; time.sleep(30)"], "b.log", 30),
    ]
    r1 = gpu_check.run_step(steps[0], str(tmp_path), 30)
    r2 = gpu_check.run_step(steps[1], str(tmp_path), 1.5)  # cut by the budget
    r3 = gpu_check.run_step(steps[1], str(tmp_path), 0.0)  # no time left: not started
    assert r1["rc"] == 0 and r1["tail"] == "3 passed, 1 skipped in 0.1s"
    assert r2["rc"] == "timeout" and r2["seconds"] < 10
    assert r3["rc"] == "no time left"
    path = gpu_check.write_summary(str(tmp_path), {"name": "NVIDIA H200", "slug": "nvidia-h200", "arch": "9.0"},
                                   [r1, r2], quick=True, total_s=12.0)
    text = open(path).read()
    assert "NVIDIA H200 (sm_90)" in text and "| tests-gpu | ok |" in text and "FAILED (timeout)" in text
    assert gpu_check.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_gpu_path_imports_without_optional_packages():
    """A GPU machine may have torch and triton and nothing else: the kernels, the
    benchmarks and the test files gpu_check runs must import without the data,
    demo and logging packages."""
    script = textwrap.dedent("""
        import importlib, importlib.abc, sys
        BLOCK = {"scipy", "h5py", "nibabel", "nilearn", "medpy", "tensorboard", "yaml", "matplotlib",
                 "pandas", "skimage", "SimpleITK", "tqdm"}
        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BLOCK:
                    raise ImportError(f"{name} is not installed (blocked by the test)")
        sys.meta_path.insert(0, Blocker())
        for m in ("icl_kernels", "icl_kernels.triton", "benches.proxy_attention", "benches.prototype_update", "benches.train_step",
                  "benches.gpu_check", "icl", "icl.models"):
            importlib.import_module(m)
        print("imported")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("only,label,selected", [
    (None, "set=amos3d;B=2", True),
    ("set=acdc2d;,set=amos3d", "set=amos3d;B=2", True),
    ("set=acdc2d;", "set=acdc2d-all-levels;B=8;K=4", False),
])
def test_bench_shape_selection(only, label, selected):
    from benches import proxy_attention as pa

    assert pa.shape_selected(label, only) is selected


@pytest.mark.parametrize("quick", [False, True])
def test_plan_measures_host_cost_early(quick):
    """The eager host-cost benchmark runs on the GPU right after the GPU tests, with
    arguments its own parser accepts."""
    from benches import overhead

    steps = gpu_check.plan("/tmp/out", quick, build=True, arch="9.0")
    names = [s.name for s in steps]
    assert "bench-overhead" in names
    assert names.index("bench-overhead") == names.index("tests-gpu") + 1
    step = steps[names.index("bench-overhead")]
    i = step.argv.index("benches.overhead")
    args = overhead.parse_args(step.argv[i + 1:], check_device=False)
    assert args.device.type == "cuda" and args.csv.endswith("overhead.csv")
    assert step.expect_s is not None and step.expect_s < step.timeout_s
