"""Benchmark of the fused momentum prototype update (masked form, integer labels).

    python -m benches.prototype_update [--quick] [--csv FILE] [--plot DIR] [--device cpu|cuda]

Providers, all computing the same thing (per-class means of a feature map
under a label map with ignored voxels, then the in-place momentum blend):
  one_hot_einsum   eager: one-hot [B, K, N], einsum, division, in-place blend (the naive form)
  scatter_add      eager: index_add of the [B*N, C] voxel rows into K+1 bins, bincount, blend
  compile          torch.compile of one_hot_einsum ("error" row when compilation fails)
  icl:<backend>    icl_kernels.masked_prototype_update_ on every backend available here

Timing: torch.utils.benchmark on CPU (median and 20th / 80th percentiles of
blocked_autorange measurements, after warm-up), CUDA events on GPU.  Modes:
fwd (forward + blend), bwd (gradient of the means w.r.t. the features, graph
kept), fwd+bwd.  Achieved bandwidth = bytes of features + labels read / time,
reported as a fraction of the copy bandwidth measured in the same run
(a large tensor.copy_, counting bytes read + written).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import icl_kernels

OP = "prototype_update"
IGNORE = -100
MOMENTUM = 0.99
COLUMNS = ["op", "provider", "mode", "shape", "dtype", "metric", "unit", "p50", "p20", "p80", "device",
           "torch_version", "triton_version", "git_commit", "timestamp"]


@dataclass
class Shape:
    B: int
    C: int
    spatial: tuple
    K: int

    @property
    def N(self) -> int:
        n = 1
        for s in self.spatial:
            n *= s
        return n

    def key(self) -> str:
        return f"B={self.B};C={self.C};N={self.N};K={self.K}"

    def label(self) -> str:
        return f"B={self.B} C={self.C} {'x'.join(map(str, self.spatial))} K={self.K}"


FULL_SHAPES = [Shape(8, 64, (128, 128), 4), Shape(2, 64, (48, 48, 48), 16)]
QUICK_SHAPES = [Shape(2, 32, (32, 32), 4), Shape(1, 32, (16, 16, 16), 8)]


# ---------------------------------------------------------------- providers (eager baselines)


def one_hot_einsum(buffer, features, labels, K):
    B, C = features.shape[:2]
    x = features.reshape(B, C, -1)
    lab = labels.reshape(B, -1)
    lab = torch.where(lab == IGNORE, K, lab)  # ignored voxels go to an extra class that is dropped
    onehot = F.one_hot(lab, K + 1)[..., :K].permute(0, 2, 1).to(x.dtype)  # [B, K, N]
    sums = torch.einsum("bkn,bcn->kc", onehot, x)
    totals = onehot.sum(dim=(0, 2))
    present = totals > 0
    means = torch.where(present[:, None], sums / totals.clamp_min(1)[:, None], torch.zeros_like(sums))
    with torch.no_grad():
        buffer.copy_(torch.where(present[:, None], MOMENTUM * buffer + (1 - MOMENTUM) * means, buffer))
    return means, totals


def scatter_add(buffer, features, labels, K):
    B, C = features.shape[:2]
    rows = features.reshape(B, C, -1).transpose(1, 2).reshape(-1, C)  # [B*N, C], a copy
    idx = labels.reshape(-1)
    idx = torch.where(idx == IGNORE, K, idx)
    sums = rows.new_zeros(K + 1, C).index_add(0, idx, rows)[:K]
    totals = torch.bincount(idx, minlength=K + 1)[:K].to(rows.dtype)
    present = totals > 0
    means = torch.where(present[:, None], sums / totals.clamp_min(1)[:, None], torch.zeros_like(sums))
    with torch.no_grad():
        buffer.copy_(torch.where(present[:, None], MOMENTUM * buffer + (1 - MOMENTUM) * means, buffer))
    return means, totals


def fused(backend: str):
    def run(buffer, features, labels, K):
        return icl_kernels.masked_prototype_update_(buffer, features, labels=labels, momentum=MOMENTUM,
                                                    ignore_index=IGNORE, backend=backend)
    return run


# ---------------------------------------------------------------- data


def make_inputs(shape: Shape, device: str, dtype: torch.dtype, pattern: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(shape.B, shape.C, *shape.spatial, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    if pattern == "random":
        labels = torch.randint(0, shape.K, (shape.B, *shape.spatial), generator=gen)
    else:  # blobs: random classes on a grid 8x coarser, upsampled (piecewise constant like a segmentation)
        coarse = torch.randint(0, shape.K, (shape.B, *[max(1, s // 8) for s in shape.spatial]), generator=gen)
        labels = F.interpolate(coarse[:, None].float(), size=shape.spatial, mode="nearest")[:, 0].long()
    labels[torch.rand(labels.shape, generator=gen) < 0.05] = IGNORE
    return feats, labels.to(device)


# ---------------------------------------------------------------- timing


def quantiles(times: List[float]):
    t = torch.tensor(times, dtype=torch.float64)
    return tuple(float(torch.quantile(t, q)) for q in (0.5, 0.2, 0.8))


def time_cpu(fn: Callable[[], object], min_run_time: float):
    from torch.utils import benchmark

    for _ in range(3):  # warm-up (allocator, lazy init, first-call dispatch)
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    if len(times) < 5:  # long calls: a few more single-call blocks for the percentiles
        times += [timer.timeit(1).times[0] for _ in range(5 - len(times))]
    return quantiles(times)


def time_cuda(fn: Callable[[], object], reps: int):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return quantiles(times)


def measure(fn, device: str, quick: bool):
    if device == "cuda":
        return time_cuda(fn, 20 if quick else 100)
    return time_cpu(fn, 0.3 if quick else 1.5)


def copy_bandwidth(device: str, quick: bool) -> float:
    """Bytes read + written per second by a large tensor.copy_ (GB/s)."""
    n = (64 if quick else 256) * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    p50, _, _ = measure(lambda: dst.copy_(src), device, quick)
    return 2 * src.numel() * src.element_size() / p50 / 1e9


# ---------------------------------------------------------------- main


def provider_table(device: str) -> Dict[str, Optional[Callable]]:
    providers: Dict[str, Optional[Callable]] = {"one_hot_einsum": one_hot_einsum, "scatter_add": scatter_add}
    providers["compile"] = "compile"  # built per shape below
    for name, reason in icl_kernels.available_backends(OP, device).items():
        providers[f"icl:{name}"] = fused(name) if reason is None else reason
    return providers


def env_info(device: str) -> Dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        commit += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    if device == "cuda":
        dev = torch.cuda.get_device_name()
    else:
        dev = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": dev, "torch_version": torch.__version__, "triton_version": triton_version,
            "git_commit": commit, "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, short timing")
    ap.add_argument("--csv", metavar="FILE", help="write the rows to this CSV file")
    ap.add_argument("--plot", metavar="DIR", help="write a bar chart per shape (needs matplotlib)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--labels", default="blobs", choices=["blobs", "random"],
                    help="label maps: piecewise constant blobs (like a segmentation) or i.i.d. per voxel")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (CPU; default: torch's choice)")
    ap.add_argument("--modes", default="fwd,bwd,fwd+bwd")
    ap.add_argument("--providers", default="", help="comma-separated subset (default: all)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU is visible")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = args.device
    modes = [m for m in args.modes.split(",") if m]
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    env = env_info(device)
    rows: List[Dict[str, object]] = []

    def add(provider, mode, shape, metric, unit, p50="", p20="", p80="", op=OP, shape_key=None):
        rows.append({"op": op, "provider": provider, "mode": mode, "shape": shape_key or shape.key(), "dtype": args.dtype,
                     "metric": metric, "unit": unit, "p50": p50, "p20": p20, "p80": p80, **env})

    copy_bw = copy_bandwidth(device, args.quick)
    rows.append({"op": "copy", "provider": "tensor.copy_", "mode": "fwd", "shape": "", "dtype": "float32",
                 "metric": "bandwidth", "unit": "GB/s (read + write)", "p50": copy_bw, "p20": "", "p80": "", **env})
    print(f"# {env['device']}; torch {env['torch_version']}; triton {env['triton_version'] or '-'}; "
          f"commit {env['git_commit']}; dtype {args.dtype}; labels {args.labels}")
    print(f"# copy bandwidth (tensor.copy_, read + write): {copy_bw:.1f} GB/s")

    providers = provider_table(device)
    if args.providers:
        keep = set(args.providers.split(","))
        providers = {k: v for k, v in providers.items() if k in keep}
    table = []
    for shape in shapes:
        feats, labels = make_inputs(shape, device, dtype, args.labels)
        bytes_read = feats.numel() * feats.element_size() + labels.numel() * labels.element_size()
        baseline: Dict[str, float] = {}
        for name, impl in providers.items():
            if isinstance(impl, str) and name != "compile":  # an unavailable backend: the reason
                for mode in modes:
                    add(name, mode, shape, "time", f"unavailable: {impl}")
                continue
            fn = impl
            if name == "compile":
                torch._dynamo.reset()
                fn = torch.compile(one_hot_einsum)
            for mode in modes:
                buffer = torch.zeros(shape.K, shape.C, device=device, dtype=torch.float32)
                f = feats.detach().requires_grad_(mode != "fwd")
                try:
                    if mode == "fwd":
                        def call(fn=fn, buffer=buffer, f=f):
                            return fn(buffer, f, labels, shape.K)
                    else:
                        means, _ = fn(buffer, f, labels, shape.K)
                        g = torch.randn_like(means)
                        if mode == "bwd":
                            def call(means=means, f=f, g=g):
                                return torch.autograd.grad(means, f, g, retain_graph=True)
                        else:
                            def call(fn=fn, buffer=buffer, f=f, g=g):
                                m, _ = fn(buffer, f, labels, shape.K)
                                return torch.autograd.grad(m, f, g)
                    p50, p20, p80 = measure(call, device, args.quick)
                except Exception as exc:  # e.g. a compile failure: an error row, keep going
                    msg = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    add(name, mode, shape, "time", msg)
                    table.append((shape.label(), name, mode, None, None, None, msg))
                    continue
                add(name, mode, shape, "time", "ms", p50 * 1e3, p20 * 1e3, p80 * 1e3)
                bw_frac = None
                if mode == "fwd":
                    bw = bytes_read / p50 / 1e9
                    bw_frac = bw / copy_bw
                    add(name, mode, shape, "read_bandwidth", "GB/s", bw, bytes_read / p80 / 1e9, bytes_read / p20 / 1e9)
                    add(name, mode, shape, "copy_fraction", f"fraction of copy bandwidth ({copy_bw:.1f} GB/s)", bw_frac,
                        bytes_read / p80 / 1e9 / copy_bw, bytes_read / p20 / 1e9 / copy_bw)
                if name == "one_hot_einsum":
                    baseline[mode] = p50
                speedup = baseline[mode] / p50 if mode in baseline else None
                if speedup is not None:
                    add(name, mode, shape, "speedup_vs_one_hot_einsum", "x", speedup)
                table.append((shape.label(), name, mode, p50 * 1e3, (p20 * 1e3, p80 * 1e3), bw_frac, speedup))
        del feats, labels

    print_table(table)
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        print(f"# wrote {len(rows)} rows to {args.csv}")
    if args.plot:
        plot(rows, args.plot)
    return 0


def print_table(table) -> None:
    head = f"{'shape':<26} {'provider':<16} {'mode':<8} {'p50 ms':>9} {'p20-p80 ms':>17} {'bw/copy':>8} {'speedup':>8}"
    print(head)
    print("-" * len(head))
    for shape, name, mode, p50, spread, frac, speedup in table:
        if p50 is None:
            print(f"{shape:<26} {name:<16} {mode:<8} {speedup}")
            continue
        sp = f"{spread[0]:.2f}-{spread[1]:.2f}"
        fr = f"{frac:.2f}" if frac is not None else ""
        su = f"{speedup:.2f}x" if speedup is not None else ""
        print(f"{shape:<26} {name:<16} {mode:<8} {p50:>9.3f} {sp:>17} {fr:>8} {su:>8}")


def plot(rows, out_dir: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# --plot: matplotlib is not installed, no plot written", file=sys.stderr)
        return
    os.makedirs(out_dir, exist_ok=True)
    timed = [r for r in rows if r["metric"] == "time" and r["unit"] == "ms"]
    for shape in sorted({r["shape"] for r in timed}):
        sel = [r for r in timed if r["shape"] == shape]
        labels = [f"{r['provider']}\n{r['mode']}" for r in sel]
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(sel)), 4))
        ax.bar(range(len(sel)), [r["p50"] for r in sel],
               yerr=[[r["p50"] - r["p20"] for r in sel], [r["p80"] - r["p50"] for r in sel]])
        ax.set_xticks(range(len(sel)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("ms (median, 20-80%)")
        ax.set_title(f"prototype update, {shape}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"prototype_update_{shape.replace(';', '_').replace('=', '')}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        print(f"# wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
