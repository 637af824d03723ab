"""Shared machinery of the benchmarks: timing, memory, bandwidth, CSV, table, plots.

Every benchmark writes rows with exactly the columns in ``COLUMNS``. A provider
that cannot run a shape still writes a row: empty numbers and the reason in
``unit`` (``oom``, ``unsupported: ...``, ``error: ...``). Rows of metric
``precision`` carry no numbers: their unit (``info: ...``) says in which dtype
the inputs and the kernels of that provider ran.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import os
import platform
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

COLUMNS = [
    "op", "provider", "mode", "shape", "dtype", "metric", "unit",
    "p50", "p20", "p80", "device", "torch_version", "triton_version", "git_commit", "timestamp",
]


def parse_args(description: str, extra: Optional[Callable[[argparse.ArgumentParser], None]] = None,
               argv: Optional[Sequence[str]] = None, check_device: bool = True) -> argparse.Namespace:
    """The shared options (plus ``extra``'s) parsed from ``argv`` (default: the command line).
    ``check_device=False`` accepts ``--device cuda`` without a GPU (to check a
    planned command line on another machine; nothing may run then)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds (smoke test)")
    p.add_argument("--csv", metavar="FILE", help="append result rows to this CSV file")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots to this folder")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--min-time", type=float, default=None, help="seconds of repeats per measurement")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if check_device and args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU is visible")
    default_dtype = "bfloat16" if args.device.type == "cuda" else "float32"
    name = args.dtype or default_dtype
    if not hasattr(torch, name) or not isinstance(getattr(torch, name), torch.dtype):
        p.error(f"--dtype: unknown dtype {name!r}")
    args.dtype = getattr(torch, name)
    if args.min_time is None:
        args.min_time = 0.05 if args.quick else 0.5
    return args


@dataclass
class Env:
    device: str
    torch_version: str
    triton_version: str
    git_commit: str
    timestamp: str


def cpu_model() -> str:
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return model


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> Env:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return Env(device_name(device), torch.__version__, triton_version, git_commit(),
               _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantiles_ms(times_s: Sequence[float]) -> tuple:
    t = torch.tensor(sorted(times_s), dtype=torch.float64) * 1e3
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def time_fn(fn: Callable[[], object], device: torch.device, min_time: float = 0.5,
            cuda_graph: bool = False, warmup: Optional[int] = None,
            min_samples: Optional[int] = None) -> tuple:
    """(p50, p20, p80) in milliseconds after warm-up.

    CPU: torch.utils.benchmark (blocked autorange, per-run times). GPU: CUDA
    events around each call; with ``cuda_graph`` the calls are captured once
    into a CUDA graph and the replay is timed.

    ``warmup`` untimed calls (default 2 on CPU, 3 on GPU) come first; at least
    ``min_samples`` timed calls (default 5 on CPU, 10 on GPU) make the
    percentiles. Smaller values keep smoke runs of slow calls short.
    """
    if device.type != "cuda":
        from torch.utils import benchmark

        warmup = 2 if warmup is None else warmup
        min_samples = 5 if min_samples is None else min_samples
        for _ in range(warmup):  # warm-up (allocations, first-call dispatch)
            fn()
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        m = timer.blocked_autorange(min_run_time=min_time)
        per_run = [t for t in m.times]
        if len(per_run) < min_samples:  # few long blocks: time individual calls instead
            # blocks of one call each are such calls already: keep them, top up
            per_run = per_run if m.number_per_run == 1 else []
            import time

            while len(per_run) < min_samples:
                t0 = time.perf_counter()
                fn()
                per_run.append(time.perf_counter() - t0)
        return quantiles_ms(per_run)
    run = fn
    if cuda_graph:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    for _ in range(3 if warmup is None else warmup):
        run()
    synchronize(device)
    times = []
    import time

    min_samples = 10 if min_samples is None else max(1, min_samples)
    start_wall = time.perf_counter()
    while len(times) < min_samples or (time.perf_counter() - start_wall < min_time and len(times) < 1000):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return quantiles_ms(times)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak allocated memory of one call beyond what was allocated before, in MiB
    (GPU only: the CPU allocator keeps no statistics)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Device copy bandwidth (read + write bytes per second), measured now."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    p50, _, _ = time_fn(lambda: dst.copy_(src), device, min_time=0.3)
    return 2 * nbytes / (p50 / 1e3) / 1e9


def backend_reasons(op: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> Dict[str, Optional[str]]:
    """icl_kernels backend -> None when a benchmark should run it on ``device``,
    else the reason row text (``unsupported: ...`` or ``skipped: ...``).

    Triton on CPU tensors only runs through Triton's interpreter
    (TRITON_INTERPRET=1, as the test suite sets without a GPU); timing the
    interpreter says nothing about the kernel, so it is skipped.
    """
    import icl_kernels

    out: Dict[str, Optional[str]] = {}
    for name, reason in icl_kernels.available_backends(op, device, dtype).items():
        if reason is not None:
            out[name] = f"unsupported: {reason}"
        elif name == "triton" and device.type == "cpu":
            out[name] = "skipped: Triton interpreter on CPU (TRITON_INTERPRET=1) times the interpreter, not a kernel"
        else:
            out[name] = None
    return out


def error_reason(exc: BaseException) -> str:
    """Reason row text for a provider that failed: ``oom`` or ``error: Type: first line``."""
    if is_oom(exc):
        return "oom"
    msg = str(exc).splitlines()[0][:120] if str(exc) else ""
    return f"error: {type(exc).__name__}: {msg}"


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower() or isinstance(exc, MemoryError)


@dataclass
class Recorder:
    op: str
    env: Env
    rows: List[Dict[str, str]] = field(default_factory=list)

    def add(self, provider: str, mode: str, shape: str, dtype: torch.dtype, metric: str, unit: str,
            values: Optional[tuple] = None) -> None:
        p50, p20, p80 = values if values is not None else ("", "", "")
        fmt = lambda v: "" if v == "" or v is None else f"{v:.6g}"
        self.rows.append({
            "op": self.op, "provider": provider, "mode": mode, "shape": shape,
            "dtype": str(dtype).replace("torch.", ""), "metric": metric, "unit": unit,
            "p50": fmt(p50), "p20": fmt(p20), "p80": fmt(p80),
            "device": self.env.device, "torch_version": self.env.torch_version,
            "triton_version": self.env.triton_version, "git_commit": self.env.git_commit,
            "timestamp": self.env.timestamp,
        })

    def write_csv(self, path: Optional[str]) -> None:
        if not path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        with open(path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerows(self.rows)
        print(f"wrote {len(self.rows)} rows to {path}")

    def print_table(self, metric: str = "time", extra: Optional[Dict[str, str]] = None) -> None:
        """One line per ``metric`` row; ``extra`` maps other metrics to column
        headers: their p50 on the same (provider, mode, shape) is shown too."""
        rows = [r for r in self.rows if r["metric"] == metric]
        if not rows:
            return
        extra = extra or {}
        found = {(r["provider"], r["mode"], r["shape"], r["metric"]): r["p50"] for r in self.rows if r["metric"] in extra}
        print(f"\n{self.op} on {self.env.device} (torch {self.env.torch_version}, triton {self.env.triton_version or '-'})")
        cols = "".join(f" {h:>12}" for h in extra.values())
        header = f"{'shape':<36} {'mode':<8} {'provider':<24} {'p50':>10} {'p20':>10} {'p80':>10}{cols}  unit"
        print(header)
        print("-" * len(header))
        for r in rows:
            vals = "".join(f" {found.get((r['provider'], r['mode'], r['shape'], m), ''):>12}" for m in extra)
            print(f"{r['shape']:<36} {r['mode']:<8} {r['provider']:<24} {r['p50']:>10} {r['p20']:>10} {r['p80']:>10}{vals}  {r['unit']}")


def shape_str(**kw) -> str:
    return ";".join(f"{k}={v}" for k, v in kw.items())


def parse_shape(shape: str) -> Dict[str, str]:
    return dict(kv.split("=", 1) for kv in shape.split(";") if "=" in kv)


def plot(rows: Iterable[Dict[str, str]], out_dir: Optional[str], op: str, sweep_key: str = "N",
         baseline: str = "published-eager") -> List[str]:
    """time vs N per provider, speedup over the baseline, peak memory: PNGs in out_dir."""
    if not out_dir:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    rows = [r for r in rows if r["p50"] and "sweep=1" in r["shape"]]
    written = []
    for metric, ylabel, fname in (("time", "time (ms)", "time"), ("peak_memory", "peak memory (MiB)", "memory")):
        sel = [r for r in rows if r["metric"] == metric and r["mode"] == "fwd+bwd"]
        if not sel:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for prov in sorted({r["provider"] for r in sel}):
            pts = sorted((int(parse_shape(r["shape"])[sweep_key]), float(r["p50"])) for r in sel if r["provider"] == prov)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(sweep_key)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{op} fwd+bwd: {ylabel} vs {sweep_key} ({sel[0]['device']})", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        path = os.path.join(out_dir, f"{op}_{fname}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        if metric == "time":
            base = {int(parse_shape(r["shape"])[sweep_key]): float(r["p50"]) for r in sel if r["provider"] == baseline}
            if base:
                fig, ax = plt.subplots(figsize=(7, 4.5))
                for prov in sorted({r["provider"] for r in sel} - {baseline}):
                    pts = sorted((int(parse_shape(r["shape"])[sweep_key]), float(r["p50"])) for r in sel if r["provider"] == prov)
                    pts = [(n, base[n] / t) for n, t in pts if n in base]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
                ax.axhline(1.0, color="k", lw=0.8)
                ax.set_xscale("log", base=2)
                ax.set_xlabel(sweep_key)
                ax.set_ylabel(f"speedup over {baseline}")
                ax.legend(fontsize=8)
                ax.grid(True, which="both", alpha=0.3)
                path = os.path.join(out_dir, f"{op}_speedup.png")
                fig.tight_layout()
                fig.savefig(path, dpi=110)
                plt.close(fig)
                written.append(path)
    for p in written:
        print(f"wrote {p}")
    return written
