"""Benchmark of the proxy cross-attention (LayerNorm of the tokens + attention
that also returns the logits) against the honest alternatives.

Run from a checkout:  python -m benches.proxy_attention [--quick] [--csv FILE] [--plot DIR] [--device cuda]

Providers (each computes LayerNorm(x) -> attention(q, x) -> (out, logits), forward
and backward with respect to q, x and every parameter):
  published-eager    the published module's formulation (icl_kernels.published)
  published-compile  torch.compile of it (inductor; compile time excluded)
  sdpa               F.scaled_dot_product_attention for the output + logits computed separately
  icl-torch          icl_kernels.ProxyAttention(token_norm=True), `torch` backend (absorbed form, PyTorch ops)
  icl-<backend>      the same module on each fused backend available here (cpu, triton, cuda)
  icl-explicit       the same module's unfused formulation (``forward_explicit``: projects every token)
  icl-auto           the same module with ``backend="auto"`` (what users get by default)
On GPU every provider is also timed replaying a CUDA graph (`<provider>+cudagraph`).

``--overhead`` measures instead the host cost of one eager forward+backward at
tiny shapes, per backend, against the published module, with dispatched ATen op
counts (benches/overhead.py, which takes its own options).

``--crossover`` measures instead the sweep behind `auto`'s CPU rules
(icl_kernels/auto.py): fwd+bwd of icl-cpu, icl-torch, icl-explicit, icl-auto and
published-eager over N for the published 2D/3D level widths and the demo's.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import icl_kernels
from icl_kernels.published import Query_Attention

from . import common

OP = "proxy_attention"

# Published level shapes (N tokens, C channels, H heads) and batch per call.
LEVELS_2D = [(1024, 128, 8), (4096, 64, 4), (16384, 32, 2)]          # ACDC 256x256, K = 4
LEVELS_3D = [(216, 256, 16), (1728, 128, 8), (13824, 64, 4)]         # 96^3 patches; AMOS K = 16


class Published(nn.Module):
    """The block's LayerNorm followed by the published attention module."""

    def __init__(self, C, H):
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.attn = Query_Attention(C, H, qkv_bias=True)

    def forward(self, q, x):
        return self.attn(q, self.norm(x))


class SDPA(nn.Module):
    """Same computation; the output through F.scaled_dot_product_attention, the
    logits (which the model needs) by a separate product."""

    def __init__(self, C, H):
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.attn = Query_Attention(C, H, qkv_bias=True)

    def forward(self, q, x):
        a = self.attn
        B, N, C = x.shape
        K, H = q.shape[1], a.num_heads
        d = C // H
        xn = self.norm(x)
        Q = a.fc_q(q).reshape(B, H, K, d)
        kv = a.fc_kv(xn).reshape(B, N, 2, H, d).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(Q, kv[0], kv[1], scale=a.scale)
        logits = torch.matmul(Q, kv[0].transpose(-1, -2)) * a.scale
        return a.proj(out.reshape(B, K, C)), logits.permute(0, 2, 1, 3)


def make_fused(C, H, backend):
    return icl_kernels.ProxyAttention(C, H, official_layout=True, token_norm=True, backend=backend)


def _compiled_published(C, H):
    # The bwd-only timing replays one backward with retain_graph=True; compiled
    # backwards that donate their saved buffers refuse that, so keep them.
    try:
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
    except ImportError:
        pass
    # Every shape set builds new modules of the same class, and each counts as a
    # recompile of the same forward: past dynamo's limit (8) it would silently run
    # eagerly and the "compile" rows would measure eager code.
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
    return torch.compile(Published(C, H))


class Explicit(nn.Module):
    """The module's unfused formulation (what `auto` runs on CPU where it is faster)."""

    def __init__(self, C, H):
        super().__init__()
        self.inner = make_fused(C, H, "torch")

    def forward(self, q, x):
        return self.inner.forward_explicit(q, x)


def providers(device: torch.device, quick: bool) -> Dict[str, Optional[Callable]]:
    """name -> factory(C, H) of a module, or None with the reason in REASONS."""
    table: Dict[str, Optional[Callable]] = {
        "published-eager": lambda C, H: Published(C, H),
        "published-compile": _compiled_published if not quick else None,
        "sdpa": lambda C, H: SDPA(C, H),
        "icl-torch": lambda C, H: make_fused(C, H, "torch"),
    }
    reasons = common.backend_reasons(OP, device)  # "unsupported: ..." / "skipped: ..." or None
    for be in ("cpu", "triton", "cuda"):
        reason = reasons[be]
        table[f"icl-{be}"] = (lambda C, H, be=be: make_fused(C, H, be)) if reason is None else None
        REASONS[f"icl-{be}"] = reason or ""
    table["icl-explicit"] = lambda C, H: Explicit(C, H)
    table["icl-auto"] = lambda C, H: make_fused(C, H, "auto")
    REASONS["published-compile"] = "skipped: --quick (compile takes minutes)" if quick else ""
    return table


REASONS: Dict[str, str] = {}


class Case:
    """Inputs, modules and output gradients for a list of levels run as one step."""

    def __init__(self, factory, levels: List[Tuple[int, int, int]], B: int, K: int, dtype, device):
        self.items = []
        g = torch.Generator(device="cpu").manual_seed(0)
        for N, C, H in levels:
            mod = factory(C, H)
            mod = mod.to(device=device)
            # Activations in the run's dtype (parameters stay float32, under autocast):
            # in a bf16 run the fused kernels then run in bf16 and read 2-byte tokens,
            # as bytes_moved assumes (float32 tokens would make them run in float32).
            q = torch.randn(B, K, C, generator=g).to(device, dtype).requires_grad_()
            # tokens as a model makes them: a [B, C, N] map viewed as [B, N, C]
            x = torch.randn(B, C, N, generator=g).to(device, dtype).transpose(1, 2).requires_grad_()
            g_out = torch.randn(B, K, C, generator=g).to(device, dtype)
            g_attn = torch.randn(B, K, H, N, generator=g).to(device, dtype)
            self.items.append((mod, q, x, g_out, g_attn))
        self.dtype = dtype
        self.device = device
        self.graph_outputs = None

    def precision(self, provider: str) -> str:
        """What actually runs, written to the CSV next to the timings (metric "precision")."""
        if self.dtype == torch.float32:
            return "info: float32 inputs and parameters, no autocast"
        name = str(self.dtype).replace("torch.", "")
        out = f"info: {name} inputs, float32 parameters, autocast {name}"
        mod, _, x, _, _ = self.items[0]
        if provider.startswith("icl-") and provider != "icl-torch":
            out += f"; fused kernel runs in {x.dtype}".replace("torch.", "")
        return out

    def _autocast(self):
        if self.dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.dtype)

    def forward(self):
        with self._autocast():
            return [mod(q, x) for mod, q, x, _, _ in self.items]

    def clear_grads(self):
        """As a training step does (zero_grad(set_to_none=True); x is an
        activation, not a leaf): no provider pays for accumulating into .grad."""
        for mod, q, x, _, _ in self.items:
            q.grad = None
            x.grad = None
            for p in mod.parameters():
                p.grad = None

    def forward_backward(self):
        self.clear_grads()
        outs = self.forward()
        tensors, grads = [], []
        for (out, attn), (_, _, _, g_out, g_attn) in zip(outs, self.items):
            tensors += [out, attn]
            grads += [g_out.to(out.dtype), g_attn.to(attn.dtype)]
        torch.autograd.backward(tensors, grads)

    def prepare_backward(self):
        """Run one forward and return a closure timing only the backward."""
        outs = self.forward()
        tensors, grads = [], []
        for (out, attn), (_, _, _, g_out, g_attn) in zip(outs, self.items):
            tensors += [out, attn]
            grads += [g_out.to(out.dtype), g_attn.to(attn.dtype)]
        def backward():
            self.clear_grads()
            torch.autograd.backward(tensors, grads, retain_graph=True)

        return backward

    def bytes_moved(self, mode: str) -> int:
        """Bytes a fused kernel must move: x read + S written (fwd); x read, dS read,
        dx written (bwd); inputs in the compute dtype."""
        esize = torch.tensor([], dtype=self.dtype).element_size()
        total = 0
        for mod, q, x, _, g_attn in self.items:
            nx, ns = x.numel(), g_attn.numel()
            fwd = (nx + ns) * esize
            bwd = (2 * nx + ns) * esize
            total += {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
        return total


def shape_sets(device: torch.device, quick: bool):
    """(label, levels, B, K) for each measured shape."""
    if quick:
        return [
            ("set=quick", [(256, 32, 2)], 2, 3),
            ("set=quick;sweep=1", [(1000, 24, 2)], 2, 3),
        ]
    sets = []
    for (N, C, H) in LEVELS_2D:
        sets.append((f"set=acdc2d;B=8;N={N};C={C};H={H};K=4", [(N, C, H)], 8, 4))
    sets.append(("set=acdc2d-all-levels;B=8;K=4", LEVELS_2D, 8, 4))
    if device.type == "cuda":
        for (N, C, H) in LEVELS_2D:
            sets.append((f"set=acdc2d-4x;B=32;N={N};C={C};H={H};K=4", [(N, C, H)], 32, 4))
    for (N, C, H) in LEVELS_3D:
        sets.append((f"set=amos3d;B=2;N={N};C={C};H={H};K=16", [(N, C, H)], 2, 16))
    top = 20 if device.type == "cuda" else 16
    for p in range(10, top + 1, 2):
        N = 2**p
        sets.append((f"set=sweep;sweep=1;B=2;N={N};C=64;H=4;K=4", [(N, 64, 4)], 2, 4))
    return sets


# The crossover sweep: (C, H, K, B) level families x token counts N.
CROSSOVER_FAMILIES = [(256, 16, 16, 2), (128, 8, 16, 2), (64, 4, 16, 2),   # 3D levels (AMOS K = 16)
                      (128, 8, 4, 8), (64, 4, 4, 8), (32, 2, 4, 8),         # 2D levels (ACDC K = 4)
                      (128, 8, 3, 4)]                                       # the demo's coarsest level
CROSSOVER_N = [36, 144, 216, 576, 1728, 4096, 13824]
CROSSOVER_PROVIDERS = ["published-eager", "icl-torch", "icl-cpu", "icl-explicit", "icl-auto"]


def crossover_sets(quick: bool):
    fams = CROSSOVER_FAMILIES[:1] if quick else CROSSOVER_FAMILIES
    ns = [36, 216] if quick else CROSSOVER_N
    return [(f"set=crossover;B={B};N={N};C={C};H={H};K={K}", [(N, C, H)], B, K)
            for (C, H, K, B) in fams for N in ns]


def median_times(paths, mode: str = "fwd+bwd") -> Dict[Tuple[str, str], float]:
    """(shape, provider) -> median over the CSV files (repeated runs) of the p50 times."""
    import csv
    import statistics

    seen: Dict[Tuple[str, str], List[float]] = {}
    for path in paths:
        with open(path, newline="") as fh:
            for r in csv.DictReader(fh):
                if r["metric"] == "time" and r["mode"] == mode and r["p50"]:
                    seen.setdefault((r["shape"], r["provider"]), []).append(float(r["p50"]))
    return {k: statistics.median(v) for k, v in seen.items()}


def shape_fields(shape: str) -> Dict[str, int]:
    """The integers of a shape label ("set=...;B=2;N=216;...") by name."""
    out = {}
    for part in shape.split(";"):
        k, _, v = part.partition("=")
        if v.isdigit():
            out[k] = int(v)
    return out


def shape_selected(label: str, only: Optional[str]) -> bool:
    """--only: comma-separated label fragments, any of which selects the shape."""
    return not only or any(part and part in label for part in only.split(","))


def main() -> None:
    import sys

    if "--overhead" in sys.argv[1:]:
        from . import overhead

        return overhead.main(sys.argv[1:])
    args = common.parse_args(
        __doc__.splitlines()[0],
        lambda p: (p.add_argument("--only", default=None,
                                  help="measure only shapes whose label contains this text "
                                       "(comma-separated: any of them)"),
                   p.add_argument("--providers", default=None, help="comma-separated provider names to run"),
                   p.add_argument("--overhead", action="store_true",
                                  help="host cost at tiny shapes instead (see benches/overhead.py)"),
                   p.add_argument("--crossover", action="store_true",
                                  help="the sweep behind auto's CPU rules instead of the headline shapes"),
                   p.add_argument("--interleave", type=int, default=0, metavar="R",
                                  help="fwd+bwd only, every provider of a shape timed in turn, R rounds; "
                                       "the row is the median round (slow drifts of a shared machine "
                                       "then hit every provider alike)")),
    )
    device, dtype = args.device, args.dtype
    env = common.environment(device)
    rec = common.Recorder(OP, env)
    table = providers(device, args.quick)
    copy_bw = common.copy_bandwidth_gbs(device)
    rec.add("device-copy", "fwd", "set=copy;bytes=268435456", dtype, "bandwidth", "GB/s", (copy_bw, copy_bw, copy_bw))
    print(f"device: {env.device}; copy bandwidth {copy_bw:.1f} GB/s; dtype {dtype}")
    graphs = [False, True] if device.type == "cuda" else [False]
    if args.crossover:
        table = {k: table[k] for k in CROSSOVER_PROVIDERS}
    if args.providers:
        wanted = set(args.providers.split(","))
        table = {k: v for k, v in table.items() if k in wanted}
    sets = crossover_sets(args.quick) if args.crossover else shape_sets(device, args.quick)
    modes = ("fwd+bwd",) if args.crossover else ("fwd", "bwd", "fwd+bwd")
    if args.interleave:
        interleaved(args, table, sets, rec)
        sets = []
    for label, levels, B, K in sets:
        if not shape_selected(label, args.only):
            continue
        if len(levels) == 1:
            N, C, H = levels[0]
            shape = label if "N=" in label else f"{label};B={B};N={N};C={C};H={H};K={K}"
        else:
            shape = label
        for name, factory in table.items():
            for use_graph in graphs:
                prov = name + ("+cudagraph" if use_graph else "")
                if factory is None:
                    rec.add(prov, "fwd+bwd", shape, dtype, "time", REASONS.get(name) or "unsupported")
                    continue
                if use_graph and name == "published-compile":
                    rec.add(prov, "fwd+bwd", shape, dtype, "time", "unsupported: compiled module inside a CUDA graph capture")
                    continue
                try:
                    case = Case(factory, levels, B, K, dtype, device)
                    for mode in modes:
                        if mode == "fwd":
                            fn = case.forward
                        elif mode == "bwd":
                            if use_graph:
                                continue  # a graph replays whole steps only
                            fn = case.prepare_backward()
                        else:
                            fn = case.forward_backward
                        vals = common.time_fn(fn, device, args.min_time, cuda_graph=use_graph)
                        rec.add(prov, mode, shape, dtype, "time", "ms", vals)
                        frac = case.bytes_moved(mode) / (vals[0] / 1e3) / 1e9 / copy_bw
                        rec.add(prov, mode, shape, dtype, "bandwidth_fraction", "fraction_of_copy", (frac, frac, frac))
                        mem = common.peak_memory_mb(fn, device) if not use_graph else None
                        if mem is not None:
                            rec.add(prov, mode, shape, dtype, "peak_memory", "MiB", (mem, mem, mem))
                        elif device.type == "cpu" and mode == "fwd+bwd":
                            rec.add(prov, mode, shape, dtype, "peak_memory", "unsupported: no CPU allocator statistics")
                    if not use_graph:  # what ran (after it ran: a failing provider gets its error row only)
                        rec.add(prov, "fwd+bwd", shape, dtype, "precision", case.precision(prov))
                    del case
                except Exception as exc:  # a provider that cannot run this shape
                    reason = "oom" if common.is_oom(exc) else f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                    rec.add(prov, "fwd+bwd", shape, dtype, "time", reason)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                print(".", end="", flush=True)
    print()
    rec.print_table()
    summarize(rec)
    rec.write_csv(args.csv)
    common.plot(rec.rows, args.plot, OP)


def interleaved(args, table, sets, rec) -> None:
    """fwd+bwd of every provider of a shape timed in turn, ``args.interleave`` rounds:
    p50 = the median of the rounds' medians, p20/p80 = the 20th/80th percentile of them."""
    import statistics

    device, dtype = args.device, args.dtype
    for label, levels, B, K in sets:
        if not shape_selected(label, args.only):
            continue
        N, C, H = levels[0]
        shape = label if len(levels) > 1 or "N=" in label else f"{label};B={B};N={N};C={C};H={H};K={K}"
        cases = {}
        for name, factory in table.items():
            if factory is None:
                rec.add(name, "fwd+bwd", shape, dtype, "time", REASONS.get(name) or "unsupported")
                continue
            try:
                cases[name] = Case(factory, levels, B, K, dtype, device)
            except Exception as exc:
                rec.add(name, "fwd+bwd", shape, dtype, "time", f"error: {type(exc).__name__}: {str(exc)[:120]}")
        rounds = {name: [] for name in cases}
        for _ in range(args.interleave):
            for name, case in cases.items():
                rounds[name].append(common.time_fn(case.forward_backward, device, args.min_time)[0])
                print(".", end="", flush=True)
        for name, v in rounds.items():
            q = sorted(v)
            lo, hi = q[int(0.2 * (len(q) - 1))], q[-1 - int(0.2 * (len(q) - 1))]
            rec.add(name, "fwd+bwd", shape, dtype, "time", "ms", (statistics.median(v), lo, hi))
            rec.add(name, "fwd+bwd", shape, dtype, "precision",
                    f"info: median of {len(v)} interleaved rounds; " + cases[name].precision(name)[6:])


def summarize(rec: common.Recorder) -> None:
    """Speed-ups of each fused provider over each alternative (fwd+bwd medians)."""
    times = {}
    for r in rec.rows:
        if r["metric"] == "time" and r["mode"] == "fwd+bwd" and r["p50"]:
            times[(r["shape"], r["provider"])] = float(r["p50"])
    shapes = sorted({s for s, _ in times})
    fused = sorted({p for _, p in times if p.startswith("icl-") and p not in ("icl-torch", "icl-explicit")})
    others = ["published-eager", "published-compile", "sdpa", "icl-torch"]
    if not fused:
        return
    print("\nspeed-up (fwd+bwd, median) of the fused providers over the alternatives")
    for shape in shapes:
        for f in fused:
            if (shape, f) not in times:
                continue
            parts = [f"{o}: {times[(shape, o)] / times[(shape, f)]:.2f}x" for o in others if (shape, o) in times]
            print(f"  {shape:<44} {f:<14} " + ", ".join(parts))


if __name__ == "__main__":
    main()
