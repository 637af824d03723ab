"""First contact with a GPU: build, GPU tests, kernel benchmarks, everything written under one folder.

    bash benches/gpu_check.sh [OUTDIR] [--quick] [--dry-run] [--no-build]
    python -m benches.gpu_check [OUTDIR] [--quick] [--dry-run] [--no-build]

For a machine with torch and triton installed and no network.  Steps, each with
its own log and time limit; a failing step is recorded and the next one runs:

1. environment: ``nvidia-smi`` and the versions of python, torch, triton, CUDA,
   nvcc and the git commit;
2. build: ``pip install --no-build-isolation --no-deps -e .`` with
   ``TORCH_CUDA_ARCH_LIST`` set to this GPU's architecture only (nothing is
   downloaded; the build is against the installed torch);
3. tests: the build tests, then the tests marked ``gpu`` of the CUDA, Triton
   and prototype-update files, with ``--durations``;
4. benchmarks: ``benches.proxy_attention`` at the headline shapes in float32
   and bfloat16 (eager, compile, SDPA, torch, triton, cuda; CUDA graphs where
   they apply), CSV and plots; the full run adds ``benches.prototype_update``;
5. ``summary.md``: what ran, how long, what failed, the speed-ups.

OUTDIR defaults to ``benches/results/<gpu-name>/``.  Budget on one H100/H200:
under 9 minutes including the build, ``--quick`` under 3 (one headline shape,
no torch.compile provider, the GPU tests minus those marked slow).
``--dry-run`` prints the plan (commands, the selected tests, the benchmark
shapes) and checks it without a GPU and without building or running anything;
CI runs it (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
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


@dataclass
class Step:
    name: str
    argv: List[str]
    log: str  # file name under OUTDIR
    timeout_s: int
    env: Dict[str, str] = field(default_factory=dict)
    required: bool = False  # a failure makes the whole check fail

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


def plan(outdir: str, quick: bool, build: bool, arch: str) -> List[Step]:
    py = sys.executable
    steps: List[Step] = []
    if build:
        steps.append(Step(
            "build", [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-v", "-e", "."],
            "build.log", 180, {"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 4),
                               "PIP_NO_INDEX": "1"}, required=True))
    common = ["-q", "-rs", "-p", "no:cacheprovider"]
    steps.append(Step("tests-build", [py, "-m", "pytest", *BUILD_TEST_FILES, *common, "--durations=10"],
                      "tests_build.log", 30, required=True))
    marker = "gpu and not slow" if quick else "gpu"
    steps.append(Step("tests-gpu", [py, "-m", "pytest", *GPU_TEST_FILES, "-m", marker, *common, "--durations=25"],
                      "tests_gpu.log", 90 if quick else 150, required=True))
    shapes = QUICK_SHAPES if quick else HEADLINE_SHAPES
    csv = os.path.join(outdir, "proxy_attention.csv")
    plots = os.path.join(outdir, "plots")

    def bench(name, dtype, only, providers, limit):
        return Step(name, [py, "-m", "benches.proxy_attention", "--device", "cuda", "--dtype", dtype, "--csv", csv,
                           "--plot", os.path.join(plots, dtype), "--only", ",".join(only),
                           "--providers", ",".join(providers), "--min-time", "0.1"],
                    f"{name.replace('-', '_')}.txt", limit)

    for dtype in DTYPES:
        # measured on an H200 (2026-11-30): bfloat16 70 s, float32 over 75 s (cut)
        steps.append(bench(f"bench-proxy-attention-{dtype}", dtype, shapes, QUICK_PROVIDERS, 45 if quick else 110))
    if not quick:
        # torch.compile costs tens of seconds per module: the compiled published
        # formulation is timed on the headline step (three 2D levels) only.
        for dtype in DTYPES:
            steps.append(bench(f"bench-proxy-attention-compile-{dtype}", dtype, QUICK_SHAPES,
                               ["published-compile"], 60))
        steps.append(Step(
            "bench-prototype-update",
            [py, "-m", "benches.prototype_update", "--device", "cuda", "--dtype", "float32",
             "--csv", os.path.join(outdir, "prototype_update.csv"), "--plot", os.path.join(plots, "prototype_update"),
             "--min-time", "0.1"],
            "bench_prototype_update.txt", 90))  # over 45 s on an H200 (cut there)
    return steps


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


BUDGET_S = {"full": 540, "quick": 180}  # 9 and 3 minutes (the full run measured 343 s on an H200 with two steps cut)


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
        try:
            proc = subprocess.run(step.argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=limit_s,
                                  env=dict(os.environ, **step.env))
            rc: object = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
            fh.write(f"\n[gpu_check] stopped after {limit_s:.0f} s\n")
    secs = time.perf_counter() - t0
    with open(log, errors="replace") as fh:
        text = fh.read()
    return {"name": step.name, "rc": rc, "seconds": secs, "log": step.log, "tail": _result_line(step, text),
            "required": step.required, "text": text}


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
    return lines[-1][:200] if lines else ""


def write_summary(outdir: str, gpu: Dict[str, Optional[str]], results: List[Dict[str, object]], quick: bool,
                  total_s: float) -> str:
    out = [f"# GPU check: {gpu['name']} (sm_{(gpu['arch'] or '').replace('.', '')})", "",
           f"Mode: {'quick' if quick else 'full'}; total {total_s:.0f} s; written by `benches/gpu_check.sh`.", "",
           "| step | status | seconds | log | result |", "|---|---|---|---|---|"]
    for r in results:
        status = "ok" if r["rc"] == 0 else f"FAILED ({r['rc']})"
        out.append(f"| {r['name']} | {status} | {r['seconds']:.0f} | {r['log']} | {r['tail']} |")
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
                    help="seconds for all steps (default 540, --quick 180); each step gets at most what is left")
    a = ap.parse_args(argv)

    gpu = gpu_info()
    if gpu["arch"] is None and not a.dry_run:
        print("gpu_check: no CUDA GPU is visible to torch; use --dry-run to see the plan", file=sys.stderr)
        return 2
    arch = gpu["arch"] or "9.0"
    outdir = os.path.abspath(a.outdir or os.path.join(ROOT, "benches", "results", gpu["slug"] or "no-gpu"))
    steps = plan(outdir, a.quick, not a.no_build, arch)
    total_budget = a.budget_s if a.budget_s is not None else BUDGET_S["quick" if a.quick else "full"]

    if a.dry_run:
        print(f"gpu_check plan ({'quick' if a.quick else 'full'}), OUTDIR={outdir}")
        print(f"GPU: {gpu['name'] or 'none visible (plan made for arch 9.0)'}; TORCH_CUDA_ARCH_LIST={arch}")
        print("step environment: nvidia-smi, versions -> nvidia-smi.txt, versions.txt")
        budget = 0
        for s in steps:
            budget += s.timeout_s
            print(f"step {s.name} (limit {s.timeout_s} s, log {s.log}):\n  {s.shell()}")
            if s.name.startswith("tests"):
                ids = collect_tests(s)
                files = sorted({i.split("::")[0] for i in ids})
                print(f"  selects {len(ids)} tests in {', '.join(files)}")
                for i in ids:
                    print(f"    {i}")
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
    with open(os.path.join(outdir, "nvidia-smi.txt"), "w") as fh:
        try:
            fh.write(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout)
            fh.write(subprocess.run(["nvidia-smi", "-q"], capture_output=True, text=True, timeout=60).stdout)
        except (OSError, subprocess.SubprocessError) as exc:
            fh.write(f"nvidia-smi: {exc}\n")
    with open(os.path.join(outdir, "versions.txt"), "w") as fh:
        fh.write(subprocess.run([sys.executable, "-c", versions_script()], capture_output=True, text=True).stdout)
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
    path = write_summary(outdir, gpu, results, a.quick, time.perf_counter() - t0)
    print(f"[gpu_check] summary: {path}")
    failed = [r["name"] for r in results if r["rc"] != 0 and r["required"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
