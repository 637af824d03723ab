"""Benchmark of the fused momentum prototype update (masked form, integer labels).

Run from a checkout:  python -m benches.prototype_update [--quick] [--csv FILE] [--plot DIR] [--device cpu|cuda]
                      [--dtype float32|bfloat16|float16|float64] [--min-time S] [--labels blobs|random]
                      [--modes fwd,bwd,fwd+bwd] [--providers NAME,...] [--threads T]

Providers, all computing the same thing (per-class means of a feature map
under a label map with ignored voxels, then the in-place momentum blend):
  one_hot_einsum   eager: one-hot [B, K, N], einsum, division, in-place blend (the naive form; the baseline)
  scatter_add      eager: index_add of the [B*N, C] voxel rows into K+1 bins, bincount, blend
  compile          torch.compile of one_hot_einsum (compile time excluded; with --quick only on the first shape)
  icl-<backend>    icl_kernels.masked_prototype_update_ on every backend available here
                   (a reason row for the others: `unsupported: ...`, `skipped: ...`)

Shapes: [B=8, C=64, 128x128, K=4] (ACDC-like 2D), [B=2, C=64, 48^3, K=16]
(AMOS-like 3D) and a sweep of square 2D maps (B=2, C=64, K=4) with N from 1k
up to 64k voxels on CPU, 1M on GPU (`sweep=1` in the shape string; plotted by
--plot). --quick uses tiny shapes.

Timing (benches.common): torch.utils.benchmark on CPU (median and 20th / 80th
percentiles of blocked_autorange measurements, after warm-up), CUDA events on
GPU.  Modes: fwd (forward + blend), bwd (gradient of the means w.r.t. the
features, graph kept), fwd+bwd.  Metrics: `time` (ms); `bandwidth_fraction`
(unit `fraction_of_copy`): bytes moved / time as a fraction of the copy
bandwidth measured in the same run (a large tensor.copy_, counting bytes read +
written; the `device-copy` row), where fwd moves the features + labels read,
bwd the labels read + the feature gradient written, fwd+bwd both;
`speedup_vs_one_hot_einsum`; `peak_memory` (MiB, GPU only).  Default dtype:
float32 on CPU, bfloat16 on GPU (the prototype buffer stays float32).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

import icl_kernels

from . import common

OP = "prototype_update"
BASELINE = "one_hot_einsum"
IGNORE = -100
MOMENTUM = 0.99
MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass
class Shape:
    name: str
    B: int
    C: int
    spatial: Tuple[int, ...]
    K: int
    sweep: bool = False

    @property
    def N(self) -> int:
        n = 1
        for s in self.spatial:
            n *= s
        return n

    def key(self) -> str:
        kw = {"set": self.name}
        if self.sweep:
            kw["sweep"] = 1
        kw.update(B=self.B, C=self.C, grid="x".join(map(str, self.spatial)), N=self.N, K=self.K)
        return common.shape_str(**kw)


def shapes(device: torch.device, quick: bool) -> List[Shape]:
    if quick:
        return [
            Shape("quick2d", 2, 32, (32, 32), 4),
            Shape("quick3d", 1, 32, (16, 16, 16), 8),
            Shape("quick-sweep", 1, 16, (16, 16), 4, sweep=True),
            Shape("quick-sweep", 1, 16, (32, 32), 4, sweep=True),
        ]
    out = [Shape("acdc2d", 8, 64, (128, 128), 4), Shape("amos3d", 2, 64, (48, 48, 48), 16)]
    top = 20 if device.type == "cuda" else 16
    for p in range(10, top + 1, 2):  # N = 2^p voxels as a square 2^(p/2) x 2^(p/2) map
        side = 2 ** (p // 2)
        out.append(Shape("sweep", 2, 64, (side, side), 4, sweep=True))
    return out


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


def providers(device: torch.device, dtype: torch.dtype) -> Dict[str, object]:
    """name -> the function, the string "compile" (built per shape), or the reason row text."""
    table: Dict[str, object] = {BASELINE: one_hot_einsum, "scatter_add": scatter_add, "compile": "compile"}
    for name, reason in common.backend_reasons(OP, device, dtype).items():
        table[f"icl-{name}"] = fused(name) if reason is None else reason
    return table


# ---------------------------------------------------------------- data


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, pattern: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(shape.B, shape.C, *shape.spatial, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    if pattern == "random":
        labels = torch.randint(0, shape.K, (shape.B, *shape.spatial), generator=gen)
    else:  # blobs: random classes on a grid 8x coarser, upsampled (piecewise constant like a segmentation)
        coarse = torch.randint(0, shape.K, (shape.B, *[max(1, s // 8) for s in shape.spatial]), generator=gen)
        labels = F.interpolate(coarse[:, None].float(), size=shape.spatial, mode="nearest")[:, 0].long()
    labels[torch.rand(labels.shape, generator=gen) < 0.05] = IGNORE
    return feats, labels.to(device)


def bytes_moved(feats: torch.Tensor, labels: torch.Tensor, mode: str) -> int:
    """fwd: features + labels read; bwd: labels read + feature gradient written; fwd+bwd: both."""
    f = feats.numel() * feats.element_size()
    lab = labels.numel() * labels.element_size()
    return {"fwd": f + lab, "bwd": lab + f, "fwd+bwd": 2 * (f + lab)}[mode]


def make_call(fn: Callable, mode: str, shape: Shape, feats: torch.Tensor, labels: torch.Tensor,
              device: torch.device) -> Callable[[], object]:
    """The closure timed for ``mode`` (bwd: one forward now, the backward replayed with the graph kept)."""
    buffer = torch.zeros(shape.K, shape.C, device=device, dtype=torch.float32)
    f = feats.detach().requires_grad_(mode != "fwd")
    if mode == "fwd":
        return lambda: fn(buffer, f, labels, shape.K)
    means, _ = fn(buffer, f, labels, shape.K)
    g = torch.randn_like(means)
    if mode == "bwd":
        return lambda: torch.autograd.grad(means, f, g, retain_graph=True)

    def step():
        m, _ = fn(buffer, f, labels, shape.K)
        return torch.autograd.grad(m, f, g)

    return step


# ---------------------------------------------------------------- main


def _extra_args(p) -> None:
    p.add_argument("--labels", default="blobs", choices=["blobs", "random"],
                   help="label maps: piecewise constant blobs (like a segmentation) or i.i.d. per voxel")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (CPU; default: torch's choice)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of fwd,bwd,fwd+bwd")
    p.add_argument("--providers", default="", help="comma-separated subset of the provider names (default: all)")


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0], _extra_args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, args.dtype
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: unknown mode(s) {bad}; choose from {list(MODES)}")
    env = common.environment(device)
    rec = common.Recorder(OP, env)
    copy_bw = common.copy_bandwidth_gbs(device)
    rec.add("device-copy", "fwd", "set=copy;bytes=268435456", torch.float32, "bandwidth", "GB/s", (copy_bw,) * 3)
    print(f"device: {env.device}; copy bandwidth (read + write) {copy_bw:.1f} GB/s; dtype {dtype}; labels {args.labels}")

    table = providers(device, dtype)
    if args.providers:
        wanted = set(args.providers.split(","))
        table = {k: v for k, v in table.items() if k in wanted}
    compiled_once = False
    for shape in shapes(device, args.quick):
        key = shape.key()
        feats, labels = make_inputs(shape, device, dtype, args.labels)
        baseline: Dict[str, float] = {}
        for name, impl in table.items():
            if isinstance(impl, str) and impl != "compile":  # a backend that cannot run here: the reason
                for mode in modes:
                    rec.add(name, mode, key, dtype, "time", impl)
                continue
            if impl == "compile":
                if args.quick and compiled_once:
                    for mode in modes:
                        rec.add(name, mode, key, dtype, "time", "skipped: --quick (torch.compile only on the first shape)")
                    continue
                torch._dynamo.reset()
                fn = torch.compile(one_hot_einsum)
                compiled_once = True
            else:
                fn = impl
            for mode in modes:
                try:
                    call = make_call(fn, mode, shape, feats, labels, device)
                    vals = common.time_fn(call, device, args.min_time)
                except Exception as exc:  # a provider that cannot run this shape: the reason, keep going
                    rec.add(name, mode, key, dtype, "time", common.error_reason(exc))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                rec.add(name, mode, key, dtype, "time", "ms", vals)
                nbytes = bytes_moved(feats, labels, mode)
                frac = [nbytes / (t / 1e3) / 1e9 / copy_bw for t in vals]
                # the 20th percentile of bandwidth comes from the 80th percentile of time
                rec.add(name, mode, key, dtype, "bandwidth_fraction", "fraction_of_copy", (frac[0], frac[2], frac[1]))
                if name == BASELINE:
                    baseline[mode] = vals[0]
                if mode in baseline:
                    s = baseline[mode] / vals[0]
                    rec.add(name, mode, key, dtype, f"speedup_vs_{BASELINE}", "x", (s, s, s))
                if device.type == "cuda":
                    try:
                        mem = common.peak_memory_mb(call, device)
                        rec.add(name, mode, key, dtype, "peak_memory", "MiB", (mem, mem, mem))
                    except Exception as exc:
                        rec.add(name, mode, key, dtype, "peak_memory", common.error_reason(exc))
                        torch.cuda.empty_cache()
                elif mode == "fwd+bwd":
                    rec.add(name, mode, key, dtype, "peak_memory", "unsupported: no CPU allocator statistics")
                del call
            print(".", end="", flush=True)
        del feats, labels
    print()
    rec.print_table(extra={"bandwidth_fraction": "bw/copy", f"speedup_vs_{BASELINE}": "speedup"})
    rec.write_csv(args.csv)
    common.plot(rec.rows, args.plot, OP, baseline=BASELINE)


if __name__ == "__main__":
    main()
