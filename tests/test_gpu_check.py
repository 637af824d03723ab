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
        for m in ("icl_kernels", "icl_kernels.triton", "benches.proxy_attention", "benches.prototype_update",
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
