"""Smoke tests of the benchmarks in benches/: each runs with --quick as a user
would (``python -m benches.<name>`` from the repository root, default threads
and device; only OpenMP's wait policy is made passive, see ``_run``) and must write a well-formed CSV (and the plots, when it measured
a sweep).

The CSV contract checked here: exactly the columns below, in order; a row is
either a measurement (numbers > 0, a unit) or a reason row (empty numbers, the
reason in ``unit``: ``unsupported: ...``, ``skipped: ...``, ``oom``,
``error: ...``); every provider that appears has a measurement or a reason.
"""
import csv
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COLUMNS = ["op", "provider", "mode", "shape", "dtype", "metric", "unit", "p50", "p20", "p80", "device",
           "torch_version", "triton_version", "git_commit", "timestamp"]
NUMBERS = ("p50", "p20", "p80")
REASON_PREFIXES = ("unsupported", "skipped", "oom", "error", "info")
# the eager provider each benchmark's speed-up plot divides by (None: no sweep, no plots)
BASELINES = {"proxy_attention": "published-eager", "prototype_update": "one_hot_einsum", "train_step": None,
             "backbones": None}


def _run(name, tmp_path):
    csv_path, plots = tmp_path / "x.csv", tmp_path / "plots"
    cmd = [sys.executable, "-m", f"benches.{name}", "--quick", "--csv", str(csv_path), "--plot", str(plots)]
    # Threads stay torch's default. Idle OpenMP workers sleep instead of spinning,
    # though: with the default (active) wait policy, a busy shared machine makes
    # every parallel region wait for descheduled spinning peers, and a --quick run
    # took 10-20x longer (train_step: ~150 s instead of ~9 s on 2 busy cores).
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert csv_path.is_file(), f"no CSV written\n{proc.stdout[-2000:]}"
    with open(csv_path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        body = list(reader)
    return header, body, plots


def _is_number(row):
    return bool(row["p50"])


def check_csv(name, header, body, plots):
    """Assert the CSV contract for benches.<name> (see the module docstring)."""
    assert header == COLUMNS
    assert body, "no rows"
    assert all(len(r) == len(COLUMNS) for r in body), "ragged CSV rows"
    rows = [dict(zip(COLUMNS, r)) for r in body]

    for r in rows:
        where = f"{r['provider']} {r['mode']} {r['shape']} {r['metric']}"
        assert r["op"] == name, where
        for col in ("provider", "mode", "metric", "dtype", "device", "torch_version", "timestamp"):
            assert r[col].strip(), f"empty {col}: {where}"
        assert r["unit"].strip(), f"no unit or reason: {where}"
        if _is_number(r):
            for col in NUMBERS:
                if r[col]:
                    v = float(r[col])  # raises on a malformed number
                    assert v > 0, f"{col}={v}: {where}"
        else:  # a reason row: no numbers at all, a documented reason
            assert not any(r[c] for c in NUMBERS), f"p20/p80 without p50: {where}"
            assert r["unit"].startswith(REASON_PREFIXES), f"unknown reason {r['unit']!r}: {where}"

    providers = {r["provider"] for r in rows}
    measured = {r["provider"] for r in rows if _is_number(r)}
    for prov in providers - measured:
        reasons = [r["unit"] for r in rows if r["provider"] == prov]
        assert all(u.startswith(REASON_PREFIXES) for u in reasons), f"{prov}: no measurement and no reason"
    assert any(r["metric"] == "time" and _is_number(r) for r in rows), "nothing was timed"
    errors = sorted({f"{r['provider']}: {r['unit']}" for r in rows if r["unit"].startswith("error")})
    if errors:  # allowed by the CSV contract, but worth seeing
        warnings.warn(f"benches.{name} --quick wrote error rows: {errors}")

    if plots is None:  # a run without --plot
        return
    sweep = [r for r in rows if "sweep=1" in r["shape"] and r["metric"] == "time" and r["mode"] == "fwd+bwd"
             and _is_number(r)]
    if sweep:
        expected = [f"{name}_time.png"]
        if any(r["provider"] == BASELINES[name] for r in sweep):
            expected.append(f"{name}_speedup.png")
        for fname in expected:
            path = plots / fname
            assert path.is_file() and path.stat().st_size > 0, f"missing plot {fname}"
    else:
        assert BASELINES[name] is None, f"benches.{name} --quick measured no sweep shape"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BASELINES))
def test_bench_quick_writes_valid_csv(name, tmp_path):
    header, body, plots = _run(name, tmp_path)
    check_csv(name, header, body, plots)


def _row(**kw):
    r = dict.fromkeys(COLUMNS, "")
    r.update(op="train_step", provider="p", mode="fwd+bwd", shape="cfg=x", dtype="float32", metric="time",
             unit="ms", p50="1.5", p20="1.4", p80="1.6", device="cpu", torch_version="2", timestamp="t")
    r.update(kw)
    return [r[c] for c in COLUMNS]


@pytest.mark.parametrize("bad, message", [
    (dict(p50="0"), "p50=0"),
    (dict(p50="", p20="1.0"), "without p50"),
    (dict(p50="", p20="", p80="", unit=""), "no unit"),
    (dict(p50="", p20="", p80="", unit="ms"), "unknown reason"),
    (dict(device=""), "empty device"),
    (dict(timestamp=""), "empty timestamp"),
])
def test_check_csv_rejects(bad, message, tmp_path):
    """The checker is not vacuous: each broken row fails it (no benchmark run)."""
    check_csv("train_step", COLUMNS, [_row(), _row(provider="q")], tmp_path)  # a valid CSV passes
    with pytest.raises(AssertionError, match=message):
        check_csv("train_step", COLUMNS, [_row(), _row(provider="q", **bad)], tmp_path)
    with pytest.raises(AssertionError):
        check_csv("train_step", list(reversed(COLUMNS)), [_row()], tmp_path)


def test_ssl_benchmark_quick(tmp_path):
    """`python -m benches.ssl --quick`: every method trains, the table, CSV and plot are
    written, and a second invocation reuses the finished runs instead of retraining."""
    pytest.importorskip("nilearn", reason="the population is built from the template in the nilearn wheel")
    out = tmp_path / "ssl"
    cmd = [sys.executable, "-m", "benches.ssl", "--quick", "--seeds", "1", "--jobs", "2", "--out", str(out),
           "--csv", str(tmp_path / "runs.csv"), "--plot", str(tmp_path / "ssl.png"),
           "--methods", "supervised,mean-teacher,fixmatch,icl,icl-confident,full"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(tmp_path / "runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["supervised", "mean-teacher", "fixmatch", "icl", "icl-confident", "full"]
    for r in rows:
        assert 0.0 <= float(r["dice_mean"]) <= 1.0 and float(r["wall_s"]) > 0
        assert 0.0 <= float(r["val_dice"]) <= 1.0 and r["command"].startswith("-m icl train")
        assert r["threads"] == "1"
    assert int(rows[-1]["labeled_slices"]) > int(rows[0]["labeled_slices"])  # "full" labels every slice
    summary = (out / "summary.md").read_text()
    assert "FixMatch" in summary and "fully supervised" in summary and (tmp_path / "ssl.png").is_file()
    t0 = os.path.getmtime(out / "runs" / "supervised-b2-s0" / "metrics.json")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    assert os.path.getmtime(out / "runs" / "supervised-b2-s0" / "metrics.json") == t0  # reused
    # without the run folders, rows of the earlier runs.csv with the same command are reused and kept
    shutil.rmtree(out / "runs")
    one = subprocess.run(cmd[:-1] + ["supervised"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    assert "reused from runs.csv" in one.stdout + one.stderr and not (out / "runs" / "supervised-b2-s0").exists()
    with open(out / "runs.csv") as fh:
        again = list(csv.DictReader(fh))
    assert [r["method"] for r in again] == ["supervised", "mean-teacher", "fixmatch", "icl", "icl-confident", "full"]
    assert again[0]["dice_mean"] == rows[0]["dice_mean"]
    # --fresh reruns what was asked and keeps the other rows listed
    fresh = subprocess.run(cmd[:-1] + ["supervised", "--fresh"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stdout[-2000:] + fresh.stderr[-2000:]
    assert (out / "runs" / "supervised-b2-s0" / "metrics.json").is_file()
    with open(out / "runs.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 6
    bad = subprocess.run([sys.executable, "-m", "benches.ssl", "--methods", "bogus"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--methods" in bad.stderr


def test_ssl_lesion_task_quick_and_gpu_profile_plan(tmp_path):
    """`--task lesions`: budgets count labeled subjects (--labeled-num, all their slices), the
    table has lesion Dice; `--profile gpu --dry-run` plans the paper-scale runs (128x128, 3000
    iterations, cuda, 14 side by side) without building or running; the same profile runs on
    the CPU with --quick --device cpu (its dry run here)."""
    pytest.importorskip("nilearn", reason="the population is built from the template in the nilearn wheel")
    out = tmp_path / "les"
    cmd = [sys.executable, "-m", "benches.ssl", "--task", "lesions", "--quick", "--seeds", "1", "--jobs", "2",
           "--out", str(out), "--methods", "supervised,icl,full", "--budgets", "1,2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(out / "runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["method"], r["labeled_subjects"]) for r in rows] == [
        ("supervised", "1"), ("icl", "1"), ("full", "4"), ("supervised", "2"), ("icl", "2")]
    assert all(r["task"] == "lesions" and 0.0 <= float(r["dice_lesion"]) <= 1.0 for r in rows)
    assert "--labeled-num 2" in rows[-1]["command"] and "--num-classes 2" in rows[-1]["command"]
    summary = (out / "summary.md").read_text()
    assert "test Dice (lesion)" in summary and "| 2 (6) |" in summary
    plan = subprocess.run([sys.executable, "-m", "benches.ssl", "--task", "lesions", "--profile", "gpu", "--dry-run",
                           "--out", str(tmp_path / "gpu")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr[-2000:]
    lines = plan.stdout.splitlines()
    assert lines[0].startswith("27 run(s), 14 at a time")
    assert all("--patch-size 128 128" in ln and "--max-iterations 3000" in ln and "--device cuda" in ln
               for ln in lines[1:]) and len(lines) == 28
    assert not (tmp_path / "gpu").exists()  # a dry run builds nothing
    dry = subprocess.run([sys.executable, "-m", "benches.ssl", "--task", "lesions", "--profile", "gpu", "--quick",
                          "--device", "cpu", "--jobs", "2", "--seeds", "1", "--budgets", "1",
                          "--methods", "supervised", "--out", str(tmp_path / "gpu")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-3000:]
    assert (tmp_path / "gpu" / "summary.md").is_file()
    bad = subprocess.run([sys.executable, "-m", "benches.ssl", "--profile", "gpu", "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--profile gpu" in bad.stderr


def test_proxy_attention_crossover_interleaved_quick(tmp_path):
    """--crossover (the sweep behind auto's CPU rule) with --interleave (providers of a
    shape timed in turn): every provider gets a time per shape, rows keep the CSV contract."""
    csv_path = tmp_path / "x.csv"
    cmd = [sys.executable, "-m", "benches.proxy_attention", "--quick", "--crossover", "--interleave", "2",
           "--providers", "published-eager,icl-cpu,icl-explicit,icl-auto", "--csv", str(csv_path)]
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(csv_path, newline="") as fh:
        reader = csv.reader(fh)
        header, body = next(reader), list(reader)
    check_csv("proxy_attention", header, body, None)
    rows = [dict(zip(COLUMNS, r)) for r in body if dict(zip(COLUMNS, r))["metric"] == "time"]
    shapes = {r["shape"] for r in rows}
    assert len(shapes) == 2 and all("set=crossover" in s for s in shapes)
    for s in shapes:
        got = {r["provider"]: r for r in rows if r["shape"] == s}
        assert set(got) == {"published-eager", "icl-cpu", "icl-explicit", "icl-auto"}, got.keys()
        for r in got.values():
            assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])


def _train_step(tmp_path, *extra, timeout=600):
    """benches.train_step at the tiny CPU config with the given options; the rows as dicts."""
    csv_path = tmp_path / "train_step.csv"
    cmd = [sys.executable, "-m", "benches.train_step", "--quick", "--device", "cpu", "--no-breakdown",
           "--csv", str(csv_path), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(csv_path, newline="") as fh:
        reader = csv.reader(fh)
        header, body = next(reader), list(reader)
    check_csv("train_step", header, body, None)
    return [dict(zip(COLUMNS, r)) for r in body], proc.stdout


def _measured(rows, provider, mode, dtype, metric="time"):
    got = [r for r in rows if (r["provider"], r["mode"], r["dtype"], r["metric"]) == (provider, mode, dtype, metric)]
    assert len(got) == 1, (provider, mode, dtype, metric, [r["unit"] for r in got])
    return got[0]


def test_train_step_providers_eager_float32_and_bf16(tmp_path):
    """The three providers the GPU check compares, eager, float32 and bf16 autocast:
    a time row each (ms, p20 <= p50 <= p80, a plausible size), the attention path
    each took (published: explicit; the fused providers: fused, the torch backend
    being named), and the default model described as build_model's defaults."""
    rows, out = _train_step(tmp_path, "--providers", "published-formulation,faithful-fused,icl-fused-conv",
                            "--amp", "none,bf16", "--attention-backend", "torch")
    for prov in ("published-formulation", "faithful-fused", "icl-default"):  # icl-fused-conv is the default model
        for dtype in ("float32", "bfloat16"):
            r = _measured(rows, prov, "eager", dtype)
            assert r["unit"] == "ms" and r["shape"].startswith("cfg=quick2d"), r
            p20, p50, p80 = float(r["p20"]), float(r["p50"]), float(r["p80"])
            assert 0.5 < p20 <= p50 <= p80 < 60_000, r
            assert float(_measured(rows, prov, "eager", dtype, "first_step")["p50"]) > 0
            assert _measured(rows, prov, "eager", dtype, "peak_memory")["unit"].startswith("info: n/a on cpu")
            paths = _measured(rows, prov, "eager", dtype, "attention")["unit"]
            if prov == "published-formulation":
                assert paths.startswith("info: 0 of ") and paths.endswith(" explicit") and " 0 explicit" not in paths
            else:
                assert " 0 explicit" in paths and not paths.startswith("info: 0 of"), paths
    model = _measured(rows, "icl-default", "eager", "float32", "model")["unit"]
    assert "build_model defaults" in model and "mixer=conv" in model and "faithful=False" in model, model
    assert "icl-fused-conv" not in {r["provider"] for r in rows}
    assert "[train_step] cfg=quick2d" in out


def test_train_step_compiled_rows_come_from_compiled_code(tmp_path):
    """--compile default through the cheap aot_eager backend (inductor on CPU takes
    minutes): the compiled row exists beside the eager one, dynamo captured a graph,
    the compile time is reported apart (first_step well above the per-step time)."""
    rows, _ = _train_step(tmp_path, "--providers", "faithful-fused", "--amp", "none", "--compile", "none",
                          "default", "--compile-backend", "aot_eager", "--attention-backend", "cpu", timeout=900)
    eager = _measured(rows, "faithful-fused", "eager", "float32")
    comp = _measured(rows, "faithful-fused", "compile-aot_eager", "float32")
    assert eager["unit"] == comp["unit"] == "ms"
    assert 0.5 < float(comp["p50"]) < 60_000
    info = _measured(rows, "faithful-fused", "compile-aot_eager", "float32", "compiled")["unit"]
    assert info.startswith("info: dynamo captured ") and not info.startswith("info: dynamo captured 0"), info
    first = float(_measured(rows, "faithful-fused", "compile-aot_eager", "float32", "first_step")["p50"])
    assert first * 1e3 > 5 * float(comp["p50"]), (first, comp["p50"])  # tracing counted there, not in the timing
    assert "9 of 9 attention calls fused" in _measured(rows, "faithful-fused", "eager", "float32", "attention")["unit"]


def test_train_step_failures_are_row_statuses(monkeypatch):
    """A compile that fails and a step that cannot run (the cpu backend has no bfloat16
    kernels) each become an error row naming what failed; nothing is raised."""
    from benches import common, train_step

    args = train_step.parse_args(["--quick", "--device", "cpu", "--compile", "none,default", "--amp", "none,bf16",
                                  "--attention-backend", "cpu"])
    rec = common.Recorder("train_step", common.environment(args.device))
    arch, patch, lb, ub, k, _ = train_step.CONFIGS["quick2d"]
    st = train_step.Step("faithful-fused", arch, patch, lb, ub, k, args.device, "cpu")

    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("inductor broke")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    line = train_step.measure(rec, st, "cfg=quick2d", "faithful-fused", "none", "default", args, {"min_samples": 1})
    assert line == "error: torch.compile(backend=inductor, mode=default) failed: RuntimeError: inductor broke"
    line = train_step.measure(rec, st, "cfg=quick2d", "faithful-fused", "bf16", "none", args, {"min_samples": 1})
    assert line.startswith("error: ") and "bfloat16" in line, line
    times = [r for r in rec.rows if r["metric"] == "time"]
    assert [(r["mode"], r["dtype"], r["p50"]) for r in times] == [("compile-default", "float32", ""),
                                                                  ("eager", "bfloat16", "")]
    assert all(r["unit"].startswith("error: ") for r in times)


@pytest.mark.parametrize("argv, message", [
    (["--compile", "fast"], "--compile: unknown ['fast']"),
    (["--amp", "fp16"], "GradScaler"),
    (["--amp", "bf16", "--dtype", "float32"], "--amp and --dtype"),
    (["--providers", "published"], "--providers: unknown ['published']"),
    (["--configs", "acdc"], "--configs: unknown ['acdc']"),
    (["--compile", "reduce-overhead", "--compile-backend", "aot_eager"], "inductor options"),
])
def test_train_step_refuses_bad_arguments(argv, message):
    from benches import train_step

    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("]", r"\]")):
        train_step.parse_args(argv, check_device=False)


def test_train_step_matrix_lists_every_measurement():
    from benches import train_step

    args = train_step.parse_args(["--device", "cuda", "--configs", "acdc2d", "--amp", "none,bf16",
                                  "--compile", "none,default", "reduce-overhead",
                                  "--providers", "published-formulation,faithful-fused,icl-default"],
                                 check_device=False)
    m = train_step.matrix(args)
    assert len(m) == 1 * 3 * 2 * 3
    assert m[0] == ("cfg=acdc2d;B=8+8;patch=256x256;K=4", "published-formulation", "float32", "eager")
    assert {x[3] for x in m} == {"eager", "compile-default", "compile-reduce-overhead"}
    assert {x[2] for x in m} == {"float32", "bfloat16"}
