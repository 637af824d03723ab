"""First contact with a GPU: build, GPU tests, training-step and kernel benchmarks, everything written under one folder.

    bash benches/gpu_check.sh [OUTDIR] [--quick] [--dry-run] [--no-build] [--only STEP,...]
    python -m benches.gpu_check [OUTDIR] [--quick] [--dry-run] [--no-build] [--only STEP,...]

For a machine with torch and triton installed and no network.  Steps, each with
its own log and time limit, in priority order; a failing step is recorded and
the next one runs; once the time budget is spent the remaining steps are not
started (the summary says so):

1. environment: ``nvidia-smi`` and the versions of python, torch, triton, CUDA,
   nvcc and the git commit;
2. build: ``pip install --no-build-isolation --no-deps -e .`` with
   ``TORCH_CUDA_ARCH_LIST`` set to this GPU's architecture only (nothing is
   downloaded; the build is against the installed torch);
3. tests: the build tests, then the tests marked ``gpu`` of the CUDA, Triton
   and prototype-update files, with ``--durations``;
4. training: ``benches.train_step`` (one ICL iteration: forward of both
   batches, both heads, losses, backward, SGD) at the paper's 2D shape (UNet2D
   256x256, 8 labeled + 8 unlabeled, 4 classes) for the published formulation,
   the faithful heads with the fused attention and the default model
   (``icl-default``), eager in float32 and bfloat16 autocast (with the
   per-part breakdown), then compiled (``torch.compile`` of forward+losses,
   ``default`` and ``reduce-overhead``, bfloat16), then the 3D shape (UNet3D
   96^3, 2+2) eager; rows in ``train_step.csv``;
5. kernel benchmarks: ``benches.proxy_attention`` at the headline shapes in
   float32 and bfloat16 (eager, compile, SDPA, torch, triton, cuda; CUDA graphs
   where they apply), CSV and plots; the full run adds ``benches.prototype_update``;
6. ``summary.md``: what ran, how long, what failed, the training table (ms per
   iteration, peak memory, speed-up over the published formulation), the
   kernel speed-ups.
Last, ``benches.inference`` (whole-case prediction, icl against MONAI; outside the
full budget: ask for it with ``--only bench-inference``).

OUTDIR defaults to ``benches/results/<gpu-name>/``.  Budget on one H100/H200:
under 9 minutes including the build, ``--quick`` under 3 (the GPU tests minus
those marked slow, the 2D training step eager only, one headline kernel shape,
no torch.compile provider); see ``plan()`` for the limits and what they assume.
``--only`` runs the steps whose names contain one of the given fragments (e.g.
``--only train-step`` for the training steps alone, after a run that built).
``--dry-run`` prints the plan (commands, the selected tests, the training
measurements, the benchmark shapes) and checks it without a GPU and without
building or running anything; CI runs it (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GPU_TEST_FILES = [
    "tests/test_gpu_proxy_attention.py",
    "tests/test_triton_proxy_attention.py",
    "tests/test_prototype_update.py",
]
BUILD_TEST_FILES = ["tests/test_build.py"]

# Headline shapes of benches.proxy_attention (label fragments for its --only).
HEADLINE_SHAPES = [
    "set=acdc2d-all-levels",  # the three published 2D levels in one step
    "set=acdc2d;",            # each 2D level
    "set=amos3d",             # the three 3D levels
    "N=65536;",               # the N sweep at 64k and 1M tokens
    "N=1048576;",
]
QUICK_SHAPES = ["set=acdc2d-all-levels"]
PROVIDERS = ["published-eager", "sdpa", "icl-torch", "icl-triton", "icl-cuda"]  # + published-compile, see plan()
QUICK_PROVIDERS = PROVIDERS
DTYPES = ["float32", "bfloat16"]

# benches.train_step: the paper's 2D shape and the 3D one; the published formulation,
# the faithful heads with the fused attention, and the default model.
TRAIN_CONFIGS_2D, TRAIN_CONFIGS_3D = ["acdc2d"], ["brats3d"]
TRAIN_PROVIDERS = ["published-formulation", "faithful-fused", "icl-default"]
# compiled steps: the published formulation first (the baseline of every ratio), then
# the default model, then faithful-fused; a step cut at its limit keeps the rows before
TRAIN_COMPILE_PROVIDERS = ["published-formulation", "icl-default", "faithful-fused"]


@dataclass
class Step:
    name: str
    argv: List[str]
    log: str  # file name under OUTDIR
    timeout_s: int
    env: Dict[str, str] = field(default_factory=dict)
    required: bool = False  # a failure makes the whole check fail
    expect_s: Optional[int] = None  # what it is expected to take on an H100/H200 (see plan())

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + " ".join(shlex.quote(a) for a in self.argv)


def gpu_info() -> Dict[str, Optional[str]]:
    """name, slug (folder name), arch ("9.0") of GPU 0; None where no GPU is visible."""
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            major, minor = torch.cuda.get_device_capability(0)
            return {"name": name, "slug": slug(name), "arch": f"{major}.{minor}"}
    except Exception:  # noqa: BLE001 - a broken CUDA setup reads as no GPU here
        pass
    return {"name": None, "slug": None, "arch": None}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def train_argv(outdir: str, configs: List[str], providers: List[str], amps: List[str], modes: List[str],
               breakdown: bool) -> List[str]:
    argv = [sys.executable, "-m", "benches.train_step", "--device", "cuda", "--configs", ",".join(configs),
            "--providers", ",".join(providers), "--amp", ",".join(amps), "--compile", ",".join(modes),
            "--csv", os.path.join(outdir, "train_step.csv"), "--min-time", "0.1"]
    return argv + ([] if breakdown else ["--no-breakdown"])


def plan(outdir: str, quick: bool, build: bool, arch: str) -> List[Step]:
    """The steps in priority order, each with its time limit.

    Limits come from the H200 run of 2026-11-30 (findings.md) where a step was
    measured there (build 66 s, build tests 5 s, bfloat16 kernel benchmark 70 s,
    float32 over 75 s, compiled attention 30 s and 36 s, prototype update over
    45 s); the GPU tests crashed there after 10 s, so their time is a guess (about
    80 s full, 50 s quick).  The training steps have not run on a GPU yet:
      - eager 2D: ~10 s of start-up (imports, CUDA, cuDNN) + per provider a model
        made on the GPU (the two spatial MLPs of the published head hold ~1e9
        parameters) and per precision 3 warm-up + >= 10 timed steps of an
        estimated 20-60 ms, a peak-memory step and the breakdown: ~35 s;
      - compiled 2D: assumed 60 s for the first inductor compile of the
        forward+losses graph and its backward (cold caches; a UNet+ICL training
        step typically takes 40-120 s on a GPU host) and ~45 s for each next
        provider (backbone kernels from inductor's cache); reduce-overhead, run
        after default, finds every kernel in the on-disk cache: ~30 s each;
      - eager 3D: as eager 2D, ~35 s (no breakdown).
    The host-cost benchmark (bench-overhead) comes right after the GPU tests: ~10 s.
    Full: 70 + 5 + 80 + 10 + 35 (2D eager) + 70 (bf16 kernels) + 150 (2D compile
    default, the limit) + 90 (reduce-overhead) = 510 s of the 525 s budget, so 3D
    eager may be cut, and the float32 kernel benchmark, the compiled attention and
    the prototype update get only what is left (they ran on the H200 before; ask
    for them with --only).  Quick: 70 + 5 + 50 + 8 + 25 (2D eager, no breakdown) =
    158 s of 170 s, the bfloat16 kernel benchmark gets the rest.
    """
    py = sys.executable
    steps: List[Step] = []
    if build:
        steps.append(Step(
            "build", [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-v", "-e", "."],
            "build.log", 180, {"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 4),
                               "PIP_NO_INDEX": "1"}, required=True, expect_s=70))
    common = ["-q", "-rs", "-p", "no:cacheprovider"]
    steps.append(Step("tests-build", [py, "-m", "pytest", *BUILD_TEST_FILES, *common, "--durations=10"],
                      "tests_build.log", 30, required=True, expect_s=5))
    marker = "gpu and not slow" if quick else "gpu"
    steps.append(Step("tests-gpu", [py, "-m", "pytest", *GPU_TEST_FILES, "-m", marker, *common, "--durations=25"],
                      "tests_gpu.log", 90 if quick else 150, required=True, expect_s=50 if quick else 80))
    # Host cost at tiny shapes (benches.overhead): the eager-speed target of the module
    # against the published one. Not yet run on a GPU: ~8 providers x rounds x calls of
    # about 1 ms each, op counts and a profiled batch, plus ~5 s of start-up: ~10 s
    # full (two shapes, 5 rounds of 50 calls), ~8 s quick (one shape, 3 of 20).
    overhead = [py, "-m", "benches.overhead", "--device", "cuda", "--csv", os.path.join(outdir, "overhead.csv")]
    steps.append(Step("bench-overhead", overhead + (["--quick"] if quick else ["--rounds", "5", "--calls", "50"]),
                      "bench_overhead.txt", 30, expect_s=8 if quick else 10))
    shapes = QUICK_SHAPES if quick else HEADLINE_SHAPES
    csv_path = os.path.join(outdir, "proxy_attention.csv")
    plots = os.path.join(outdir, "plots")

    def bench(name, dtype, only, providers, limit, expect):
        return Step(name, [py, "-m", "benches.proxy_attention", "--device", "cuda", "--dtype", dtype, "--csv", csv_path,
                           "--plot", os.path.join(plots, dtype), "--only", ",".join(only),
                           "--providers", ",".join(providers), "--min-time", "0.1"],
                    f"{name.replace('-', '_')}.txt", limit, expect_s=expect)

    def train(name, configs, providers, amps, modes, limit, expect, breakdown=False):
        return Step(name, train_argv(outdir, configs, providers, amps, modes, breakdown),
                    f"{name.replace('-', '_')}.txt", limit, expect_s=expect)

    # measured on an H200 (2026-11-30): bfloat16 70 s, float32 over 75 s (cut)
    kernels = {"bfloat16": bench("bench-proxy-attention-bfloat16", "bfloat16", shapes, QUICK_PROVIDERS,
                                 45 if quick else 110, 30 if quick else 70),
               "float32": bench("bench-proxy-attention-float32", "float32", shapes, QUICK_PROVIDERS,
                                45 if quick else 110, 35 if quick else 90)}
    if quick:
        steps.append(train("train-step-2d-eager", TRAIN_CONFIGS_2D, TRAIN_PROVIDERS, ["none", "bf16"], ["none"],
                           45, 25))
        steps += [kernels["bfloat16"], kernels["float32"]]
        return steps
    steps.append(train("train-step-2d-eager", TRAIN_CONFIGS_2D, TRAIN_PROVIDERS, ["none", "bf16"], ["none"], 75, 35,
                       breakdown=True))
    steps.append(kernels["bfloat16"])
    # 15 s start-up + 60 s (first compile) + 2 x 45 s = 165 s expected: the limit may cut faithful-fused
    steps.append(train("train-step-2d-compile-default", TRAIN_CONFIGS_2D, TRAIN_COMPILE_PROVIDERS, ["bf16"],
                       ["default"], 150, 165))
    steps.append(train("train-step-2d-compile-reduce-overhead", TRAIN_CONFIGS_2D, TRAIN_COMPILE_PROVIDERS, ["bf16"],
                       ["reduce-overhead"], 120, 105))  # 15 s + 3 x 30 s
    steps.append(train("train-step-3d-eager", TRAIN_CONFIGS_3D, TRAIN_PROVIDERS, ["none", "bf16"], ["none"], 75, 35))
    steps.append(kernels["float32"])
    # torch.compile costs tens of seconds per module: the compiled published
    # formulation is timed on the headline step (three 2D levels) only.
    for dtype, took in zip(DTYPES, (30, 36)):
        steps.append(bench(f"bench-proxy-attention-compile-{dtype}", dtype, QUICK_SHAPES, ["published-compile"], 60,
                           took))
    steps.append(Step(
        "bench-prototype-update",
        [py, "-m", "benches.prototype_update", "--device", "cuda", "--dtype", "float32",
         "--csv", os.path.join(outdir, "prototype_update.csv"), "--plot", os.path.join(plots, "prototype_update"),
         "--min-time", "0.1"],
        "bench_prototype_update.txt", 90, expect_s=75))  # over 45 s on an H200 (cut there)
    # whole-case prediction (icl.predict against MONAI's sliding_window_inference, 2D and 3D,
    # up to 96^3 windows): not yet run on a GPU; ~10 s start-up + 4 shapes x 6 providers of
    # well under a second per case each: ~40 s expected
    steps.append(Step("bench-inference", [py, "-m", "benches.inference", "--device", "cuda", "--min-time", "0.1",
                                          "--csv", os.path.join(outdir, "inference.csv")],
                      "bench_inference.txt", 90, expect_s=40))
    return steps


def select_steps(steps: List[Step], only: Optional[str]) -> List[Step]:
    """The steps whose name contains one of the comma-separated fragments of ``only`` (all when None)."""
    if only is None:
        return steps
    frags = [f.strip() for f in only.split(",") if f.strip()]
    chosen = [s for s in steps if any(f in s.name for f in frags)]
    if not frags or not chosen:
        raise ValueError(f"--only {only!r}: matches no step; the steps are {', '.join(s.name for s in steps)}")
    return chosen


def is_train_step(step: Step) -> bool:
    return "benches.train_step" in step.argv


def train_matrix(step: Step):
    """(config label, provider, dtype, mode) of every measurement a training step asks
    for, from its command line parsed by benches.train_step itself (raises
    SystemExit with the parser's message on a bad one)."""
    from benches import train_step

    i = step.argv.index("benches.train_step")
    return train_step.matrix(train_step.parse_args(step.argv[i + 1:], check_device=False))


def collect_tests(step: Step) -> List[str]:
    """The test ids a pytest step selects (pytest --collect-only; nothing runs)."""
    argv = [a for a in step.argv if not a.startswith("--durations") and a != "-q"] + ["--collect-only", "-q"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **step.env))
    ids = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    if proc.returncode not in (0, 5) or not ids:
        raise RuntimeError(f"{step.name}: pytest --collect-only failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return ids


def benchmark_shapes(quick: bool) -> List[str]:
    import torch

    from benches import proxy_attention as pa

    only = ",".join(QUICK_SHAPES if quick else HEADLINE_SHAPES)
    return [label for label, _, _, _ in pa.shape_sets(torch.device("cuda"), False) if pa.shape_selected(label, only)]


def versions_script() -> str:
    return (
        "import platform, sys, torch\n"
        "print('python', sys.version.split()[0], platform.platform())\n"
        "print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())\n"
        "try:\n    import triton; print('triton', triton.__version__)\n"
        "except Exception as e:\n    print('triton: not importable:', e)\n"
        "print('gpus', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])\n"
    )


# Seconds for the environment probes and all steps: 9 and 3 minutes less ~15 s and
# ~10 s for what the budget does not count (starting python and torch, the GPU query
# before the clock starts, killing a step cut at its limit, the summary).
BUDGET_S = {"full": 525, "quick": 170}


def run_step(step: Step, outdir: str, limit_s: float) -> Dict[str, object]:
    """Run one step, its output to its log, for at most limit_s seconds."""
    log = os.path.join(outdir, step.log)
    t0 = time.perf_counter()
    if limit_s < 1:
        with open(log, "w") as fh:
            fh.write("[gpu_check] not run: the time budget is spent\n")
        return {"name": step.name, "rc": "no time left", "seconds": 0.0, "log": step.log, "tail": "not run",
                "required": step.required, "text": ""}
    with open(log, "w") as fh:
        fh.write(f"$ {step.shell()}\n\n")
        fh.flush()
        # its own process group: a step cut at its limit is stopped with everything it
        # started (compiler jobs of the build, inductor's compile workers)
        proc = subprocess.Popen(step.argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                env=dict(os.environ, **step.env), start_new_session=True)
        try:
            rc: object = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            rc = "timeout"
            _kill_group(proc)
            fh.write(f"\n[gpu_check] stopped after {limit_s:.0f} s\n")
        except BaseException:
            _kill_group(proc)
            raise
    secs = time.perf_counter() - t0
    with open(log, errors="replace") as fh:
        text = fh.read()
    return {"name": step.name, "rc": rc, "seconds": secs, "log": step.log, "tail": _result_line(step, text),
            "required": step.required, "text": text}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def _result_line(step: Step, text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if step.name.startswith("tests"):
        for ln in reversed(lines):
            if re.search(r"\d+ (passed|failed|skipped|error)", ln):
                return ln.strip("= ")
    if step.name == "build":
        for ln in lines:
            if "CUDA kernels:" in ln:
                return ln.strip()
    if is_train_step(step):
        done = [ln for ln in lines if ln.startswith("[train_step] ")]
        if done:
            return f"{len(done)} measurement(s); last: {done[-1][len('[train_step] '):][:160]}"
    return lines[-1][:200] if lines else ""


def required_training(quick: bool) -> List[tuple]:
    """(config label, provider, dtype, mode) the plan must contain: 2D eager float32 and
    bfloat16 for the three providers; the full plan also 2D compiled (default and
    reduce-overhead, bfloat16) and 3D eager."""
    from benches import train_step

    d2, d3 = train_step.config_label(TRAIN_CONFIGS_2D[0]), train_step.config_label(TRAIN_CONFIGS_3D[0])
    need = [(d2, p, dt, "eager") for p in TRAIN_PROVIDERS for dt in DTYPES]
    if not quick:
        need += [(d2, p, "bfloat16", m) for p in TRAIN_PROVIDERS for m in ("compile-default", "compile-reduce-overhead")]
        need += [(d3, p, dt, "eager") for p in TRAIN_PROVIDERS for dt in DTYPES]
    return need


def _read_train_rows(path: str, since: Optional[_dt.datetime]) -> List[Dict[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("op") == "train_step"]
    if since is not None:
        def recent(r):
            try:
                return _dt.datetime.fromisoformat(r["timestamp"]) >= since
            except (KeyError, ValueError):
                return False
        rows = [r for r in rows if recent(r)]
    return rows


def training_summary(csv_path: str, planned: List[tuple], since: Optional[_dt.datetime] = None) -> List[str]:
    """Markdown: every planned training measurement with ms/iter, peak memory, first-step
    seconds, the speed-up over the published formulation (same shape, precision and
    mode) and over the same provider eager; then the eager breakdown."""
    rows = _read_train_rows(csv_path, since)
    by = {}
    for r in rows:  # the last row of a kind wins (a CSV appended to by several runs)
        by[(r["shape"], r["provider"], r["dtype"], r["mode"], r["metric"])] = r
    num = lambda key, metric: (by.get((*key, metric)) or {}).get("p50") or ""
    out = ["", "## Training step (benches.train_step)", "",
           "One ICL iteration (forward of both batches, both heads, losses, backward, SGD); ms per iteration "
           "(median), peak = torch.cuda.max_memory_allocated over one step (parameters, gradients, momentum "
           "included); first step: for compiled modes the compile of forward and backward; speed-up = "
           "published-formulation's time / this time (same shape, precision, mode), and eager time / this time. "
           f"Rows: `{os.path.basename(csv_path)}`.", "",
           "| config | precision | mode | provider | ms/iter | peak MiB | first step s | vs published | vs eager | status |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, nd=1: f"{float(v):.{nd}f}" if v else ""
    ratio = lambda a, b: f"{float(a) / float(b):.2f}x" if a and b else ""
    for key in planned:
        shape, prov, dtype, mode = key
        t = num(key, "time")
        row = by.get((*key, "time"))
        status = "ok" if t else (row["unit"] if row else "not measured (the step stopped or did not start)")
        info = by.get((*key, "compiled"))
        if t and info:  # what dynamo captured (and whether CUDA graphs were skipped)
            status += "; " + info["unit"].replace("info: ", "", 1)
        pub = num((shape, "published-formulation", dtype, mode), "time")
        eager = num((shape, prov, dtype, "eager"), "time") if mode != "eager" else ""
        cfg = shape.split(";")[0].replace("cfg=", "")
        peak = fmt(num(key, "peak_memory"), 0) or ("n/a" if t and by.get((*key, "peak_memory")) else "")
        out.append(f"| {cfg} | {dtype} | {mode} | {prov} | {fmt(t, 2)} | {peak} | "
                   f"{fmt(num(key, 'first_step'))} | {ratio(pub, t) if prov != 'published-formulation' else ''} | "
                   f"{ratio(eager, t)} | {status.replace('|', '/')} |")
    parts = ["backbone", "attention", "spatial_mixing", "losses", "optimizer"]
    brk = [(s, p, d) for (s, p, d, m) in planned if m == "eager" and num((f"{s};part=backbone", p, d, m), "time")]
    if brk:
        out += ["", "Eager breakdown (ms; each part timed alone, forward+backward):", "",
                "| config | precision | provider | step | " + " | ".join(parts) + " |",
                "|---|---|---|---|" + "---|" * len(parts)]
        for s, p, d in brk:
            vals = " | ".join(fmt(num((f"{s};part={x}", p, d, "eager"), "time"), 2) for x in parts)
            out.append(f"| {s.split(';')[0].replace('cfg=', '')} | {d} | {p} | {fmt(num((s, p, d, 'eager'), 'time'), 2)} "
                       f"| {vals} |")
    return out


def write_summary(outdir: str, gpu: Dict[str, Optional[str]], results: List[Dict[str, object]], quick: bool,
                  total_s: float, steps: Optional[List[Step]] = None, since: Optional[_dt.datetime] = None) -> str:
    out = [f"# GPU check: {gpu['name']} (sm_{(gpu['arch'] or '').replace('.', '')})", "",
           f"Mode: {'quick' if quick else 'full'}; total {total_s:.0f} s; written by `benches/gpu_check.sh`.", "",
           "| step | status | seconds | log | result |", "|---|---|---|---|---|"]
    for r in results:
        status = "ok" if r["rc"] == 0 else f"FAILED ({r['rc']})"
        out.append(f"| {r['name']} | {status} | {r['seconds']:.0f} | {r['log']} | {str(r['tail']).replace('|', '/')} |")
    planned = [m for s in (steps or []) if is_train_step(s) for m in train_matrix(s)]
    if planned:
        out += training_summary(os.path.join(outdir, "train_step.csv"), planned, since)
    for r in results:
        text = str(r["text"])
        if r["name"].startswith("bench-proxy") and "speed-up" in text:
            out += ["", f"## {r['name']}", "", "```", text[text.index("speed-up"):].strip(), "```"]
        if r["name"].startswith("tests") and "slowest" in text:
            block = text[text.index("slowest"):].splitlines()[:30]
            out += ["", f"## {r['name']}: slowest tests", "", "```", *block, "```"]
    path = os.path.join(outdir, "summary.md")
    with open(path, "w") as fh:
        fh.write("\n".join(out) + "\n")
    return path


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", nargs="?", default=None, help="default: benches/results/<gpu-name>/")
    ap.add_argument("--quick", action="store_true", help="one headline shape, no torch.compile, fewer tests (< 3 min)")
    ap.add_argument("--dry-run", action="store_true", help="print and check the plan; build and run nothing")
    ap.add_argument("--no-build", action="store_true", help="skip the pip build (extension already built here)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"seconds for all steps (default {BUDGET_S['full']}, --quick {BUDGET_S['quick']}); "
                         "each step gets at most what is left")
    ap.add_argument("--only", default=None, metavar="STEP,...",
                    help="run only the steps whose names contain one of these fragments (see --dry-run)")
    a = ap.parse_args(argv)

    gpu = gpu_info()
    if gpu["arch"] is None and not a.dry_run:
        print("gpu_check: no CUDA GPU is visible to torch; use --dry-run to see the plan", file=sys.stderr)
        return 2
    arch = gpu["arch"] or "9.0"
    outdir = os.path.abspath(a.outdir or os.path.join(ROOT, "benches", "results", gpu["slug"] or "no-gpu"))
    try:
        steps = select_steps(plan(outdir, a.quick, not a.no_build, arch), a.only)
    except ValueError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    total_budget = a.budget_s if a.budget_s is not None else BUDGET_S["quick" if a.quick else "full"]

    if a.dry_run:
        print(f"gpu_check plan ({'quick' if a.quick else 'full'}), OUTDIR={outdir}")
        print(f"GPU: {gpu['name'] or 'none visible (plan made for arch 9.0)'}; TORCH_CUDA_ARCH_LIST={arch}")
        print("step environment: nvidia-smi, versions -> nvidia-smi.txt, versions.txt")
        budget = 0
        expected = 0.0
        training: List[tuple] = []
        for s in steps:
            budget += s.timeout_s
            exp = ""
            if s.expect_s is not None:
                start, expected = expected, expected + min(s.expect_s, s.timeout_s)
                if start >= total_budget:
                    exp = f"; expected {s.expect_s} s: not reached within the budget"
                elif expected > total_budget:
                    exp = f"; expected {s.expect_s} s, from {start:.0f} s: cut by the budget at {total_budget:.0f} s"
                else:
                    exp = f"; expected {s.expect_s} s, done by {expected:.0f} s"
            print(f"step {s.name} (limit {s.timeout_s} s{exp}; log {s.log}):\n  {s.shell()}")
            if s.name.startswith("tests"):
                ids = collect_tests(s)
                files = sorted({i.split("::")[0] for i in ids})
                print(f"  selects {len(ids)} tests in {', '.join(files)}")
                for i in ids:
                    print(f"    {i}")
            if is_train_step(s):
                try:
                    meas = train_matrix(s)
                except SystemExit as exc:
                    print(f"gpu_check: step {s.name}: {exc}", file=sys.stderr)
                    return 1
                training += meas
                print(f"  measures {len(meas)} training configurations (config | provider | precision | mode):")
                for m in meas:
                    print("    " + " | ".join(m))
        if a.only is None:
            missing = [m for m in required_training(a.quick) if m not in training]
            if missing:
                print("gpu_check: the plan lacks training measurements: "
                      + "; ".join(" | ".join(m) for m in missing), file=sys.stderr)
                return 1
        shapes = benchmark_shapes(a.quick)
        if not shapes:
            print("gpu_check: the shape selection matches no benchmark shape", file=sys.stderr)
            return 1
        print(f"benchmark shapes ({len(shapes)}), dtypes {', '.join(DTYPES)}:")
        for label in shapes:
            print(f"    {label}")
        print(f"step limits add up to {budget} s; the run stops starting steps after {total_budget:.0f} s "
              f"(each step gets at most what is left)")
        print("dry run: nothing was built or run")
        return 0

    os.makedirs(outdir, exist_ok=True)
    t0 = time.perf_counter()
    since = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)  # rows of this run (CSVs are appended to)
    with open(os.path.join(outdir, "nvidia-smi.txt"), "w") as fh:
        try:
            fh.write(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout)
            fh.write(subprocess.run(["nvidia-smi", "-q"], capture_output=True, text=True, timeout=60).stdout)
        except (OSError, subprocess.SubprocessError) as exc:
            fh.write(f"nvidia-smi: {exc}\n")
    with open(os.path.join(outdir, "versions.txt"), "w") as fh:
        try:
            fh.write(subprocess.run([sys.executable, "-c", versions_script()], capture_output=True, text=True,
                                    timeout=120).stdout)
        except subprocess.SubprocessError as exc:
            fh.write(f"versions: {exc}\n")
        for cmd in (["nvcc", "--version"], ["git", "-C", ROOT, "rev-parse", "HEAD"], ["git", "-C", ROOT, "status", "--short"]):
            try:
                fh.write(f"$ {' '.join(cmd)}\n" + subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout)
            except (OSError, subprocess.SubprocessError) as exc:
                fh.write(f"{cmd[0]}: {exc}\n")
    results = []
    for s in steps:
        print(f"[gpu_check] {s.name}: {s.shell()}", flush=True)
        left = total_budget - (time.perf_counter() - t0)
        r = run_step(s, outdir, min(s.timeout_s, left))
        print(f"[gpu_check] {s.name}: rc={r['rc']} in {r['seconds']:.0f} s; {r['tail']}", flush=True)
        results.append(r)
    path = write_summary(outdir, gpu, results, a.quick, time.perf_counter() - t0, steps, since)
    print(f"[gpu_check] summary: {path}")
    failed = [r["name"] for r in results if r["rc"] != 0 and r["required"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
