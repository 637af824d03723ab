"""Host cost of one eager forward+backward at tiny shapes, where the kernels cost
almost nothing and what is measured is the calls around them.

Run from a checkout:  python -m benches.proxy_attention --overhead [--quick] [--csv FILE] [--device cuda]
(or python -m benches.overhead)

Rows (metric / unit):
  host_time / us       median over interleaved rounds (every provider of a shape in
                       turn, --rounds of them) of the mean time of a batch of calls;
                       on a GPU the batch is synchronised once at its end, so at these
                       shapes it is the host's time
  aten_ops / count     ATen ops dispatched below autograd in one forward+backward
                       (a TorchDispatchMode), the loss included
  aten_launch_ops      the same without view ops (on a GPU each is a kernel launch)
  share / fraction     (provider ``<name>:part=<piece>``) the profiler's share of the
                       module's host time per piece (kernels, fold, unfold: their
                       profiler scopes, inner calls included; rest)
  piece_time / us      (provider ``<name>:piece=<piece>``) each piece of the module's
                       forward+backward timed alone on a real call's inputs: argument
                       checks, backend resolution, parameter access, fold, kernels,
                       unfold and their backwards; the remainder of the whole is the
                       autograd node, the engine and the loss
Providers:
  published            LayerNorm + the published Query_Attention (icl_kernels.published)
  icl-<backend>        ProxyAttention(token_norm=True, official_layout=True) on each
                       available backend
  op-<backend>         the op proxy_attention(x, A, c, eps) alone
  memory-<backend>     PrototypeMemory.update(values, weights) and a loss on the means
  memory-plain         the same update written plainly (weighted mean, momentum blend)
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Callable, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import icl_kernels

from . import common
from .proxy_attention import Published  # LayerNorm + the published Query_Attention

OP = "overhead"
# (label, B, K, C, H, N): the tiny shape, and many query rows (AMOS-like K = 16)
SHAPES = [("set=tiny;B=2;K=4;C=32;H=4;N=64", 2, 4, 32, 4, 64),
          ("set=tiny-rows;B=2;K=16;C=64;H=4;N=64", 2, 16, 64, 4, 64)]
VIEW_OPS = {"view", "_unsafe_view", "permute", "transpose", "t", "expand", "slice", "select", "unsqueeze",
            "squeeze", "detach", "alias", "as_strided", "reshape", "unbind", "split", "narrow", "diagonal"}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(step: Callable[[], None]) -> Counter:
    step()  # caches filled
    with _Count() as mode:
        step()
    return mode.ops


def _attention_step(module, q, x):
    def step():
        q.grad = x.grad = None
        for p in module.parameters():
            p.grad = None
        out, attn = module(q, x)
        (out.sum() + attn.sum()).backward()
    return step


def _op_step(x, A, c, backend):
    def step():
        x.grad = A.grad = c.grad = None
        Z, S = icl_kernels.proxy_attention(x, A, c, eps=1e-5, backend=backend)
        (Z.sum() + S.sum()).backward()
    return step


def _memory_step(mem, values, weights):
    def step():
        values.grad = None
        means, _ = mem.update(values, weights)
        means.sum().backward()
    return step


def _plain_memory_step(buffer, values, weights, momentum=0.99):
    def step():
        values.grad = None
        totals = weights.sum(0)
        means = (values * weights.unsqueeze(-1)).sum(0) / totals.clamp_min(1e-12).unsqueeze(1)
        with torch.no_grad():
            buffer.mul_(momentum).add_(means.detach(), alpha=1 - momentum)
        means.sum().backward()
    return step


def make_steps(shape, device, backends_here: List[str]) -> Dict[str, Callable[[], None]]:
    _, B, K, C, H, N = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, K, C, generator=g).to(device).requires_grad_()
    x = torch.randn(B, C, N, generator=g).to(device).transpose(1, 2).requires_grad_()  # a feature map's view
    steps: Dict[str, Callable[[], None]] = {}
    pub = Published(C, H).to(device)
    steps["published"] = _attention_step(pub, q, x)
    for be in backends_here:
        mod = icl_kernels.ProxyAttention(C, H, official_layout=True, token_norm=True, backend=be).to(device)
        mod.load_state_dict({"norm_x." + k[5:] if k.startswith("norm.") else k[5:]: v
                             for k, v in pub.state_dict().items()})
        steps[f"icl-{be}"] = _attention_step(mod, q, x)
    M = H * K
    A = torch.randn(B, M, C, generator=g).to(device).requires_grad_()
    c = torch.randn(B, M, generator=g).to(device).requires_grad_()
    for be in backends_here:
        steps[f"op-{be}"] = _op_step(x, A, c, be)
    values = torch.randn(B, K, C, generator=g).to(device).requires_grad_()
    weights = torch.rand(B, K, generator=g).to(device)
    for be in backends_here:
        mem = icl_kernels.PrototypeMemory(K, C, backend=be, device=device)
        steps[f"memory-{be}"] = _memory_step(mem, values, weights)
    steps["memory-plain"] = _plain_memory_step(torch.zeros(K, C, device=device), values, weights)
    return steps


def host_time_us(step, device, calls: int) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / calls * 1e6


# Pieces of the module's forward+backward, by the profiler event they show up as
# (the C++ pieces open a profiler scope of their own, in the C++ node and when the
# Python Function calls them alike).
PIECES = [
    ("kernels", ("icl_kernels::_proxy_attention_forward", "icl_kernels::_proxy_attention_backward")),
    ("fold", ("icl_kernels::fold", "icl_kernels::fold_backward")),
    ("unfold", ("icl_kernels::unfold", "icl_kernels::unfold_backward")),
]


def profile_pieces(step, device, calls: int) -> Dict[str, float]:
    """Share of the step's host time per piece under torch.profiler: the kernels and
    the fold / unfold pieces (forward and backward, their inner ATen calls included);
    "rest" is everything else (argument checks, backend resolution, the autograd
    node and engine, the loss), with the profiler's own cost in every piece."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = (time.perf_counter() - t0) * 1e6
    totals = {name: 0.0 for name, _ in PIECES}
    for ev in prof.key_averages():
        for name, keys in PIECES:
            if ev.key in keys:
                totals[name] += ev.cpu_time_total  # us, inner calls included
    out = {name: v / wall for name, v in totals.items()}
    out["rest"] = max(0.0, 1.0 - sum(out.values()))
    return out


def timed_pieces(shape, device, backend: str, calls: int) -> Dict[str, float]:
    """Host time (us) of each piece of the module's forward+backward called alone on
    the inputs of a real call (so they need not add up exactly to the whole)."""
    from icl_kernels import backends as be
    from icl_kernels.nn import _weight_and_bias
    from icl_kernels.ops import proxy_attention_block as blk
    from icl_kernels.ops.proxy_attention import resolve_backend

    _, B, K, C, H, N = shape
    g = torch.Generator().manual_seed(1)
    mod = icl_kernels.ProxyAttention(C, H, official_layout=True, token_norm=True, backend=backend).to(device)
    q = torch.randn(B, K, C, generator=g).to(device).requires_grad_()
    x = torch.randn(B, C, N, generator=g).to(device).transpose(1, 2).requires_grad_()
    kern = resolve_backend(backend, x).kernels("proxy_attention")
    Wq, bq = _weight_and_bias(mod.fc_q)
    Wkv, bkv = _weight_and_bias(mod.fc_kv)
    Wp, bp = _weight_and_bias(mod.proj)
    gamma, beta = _weight_and_bias(mod.norm_x)
    mask = blk.head_mask(K, H, True, q.device, Wq.dtype, cache=True)
    eps, scale = mod.norm_x.eps, mod.scale
    with torch.no_grad():
        q2, Qe, Wk_f, v, A, c = blk._FOLD(q, Wq, bq, Wkv, bkv, gamma, beta, mask, scale, x.dtype)
        Z, S, lse = kern[0](x, A, c, eps)
        Zc, Zt, O, out = blk._UNFOLD(Z, Wkv, bkv, gamma, beta, Wp, bp, mask, True)
        d_out, dS = torch.ones_like(out), torch.ones_like(S)
        dZ, dWp, dbp, dWv, dbv, dgamma, dbeta = blk._UNFOLD_BACKWARD(d_out, Zc, Zt, O, Wkv, gamma, Wp, mask, x.dtype)
        dx, dA, dc = kern[1](dZ, dS, x, A, c, Z, lse, eps)
    name = be.requested_name(backend)
    pieces = {
        "argument checks": lambda: (mod._check_forward_inputs(q, x), be.requested_name(backend),
                                    mod._auto_unfused(x, N, K, name)),
        "backend resolution": lambda: resolve_backend(name, x),
        "parameter access": lambda: [_weight_and_bias(m) for m in (mod.fc_q, mod.fc_kv, mod.proj, mod.norm_x)],
        "fold": lambda: blk._FOLD(q, Wq, bq, Wkv, bkv, gamma, beta, mask, scale, x.dtype),
        "kernel forward": lambda: kern[0](x, A, c, eps),
        "unfold": lambda: blk._UNFOLD(Z, Wkv, bkv, gamma, beta, Wp, bp, mask, True),
        "unfold backward": lambda: blk._UNFOLD_BACKWARD(d_out, Zc, Zt, O, Wkv, gamma, Wp, mask, x.dtype),
        "kernel backward": lambda: kern[1](dZ, dS, x, A, c, Z, lse, eps),
        "fold backward": lambda: blk._FOLD_BACKWARD(dA, dc, q2, Qe, Wq, Wkv, Wk_f, v, gamma, beta, mask, True,
                                                    scale, dWv, dbv, dgamma, dbeta),
    }
    out_us = {}
    with torch.no_grad():
        for part, fn in pieces.items():
            fn()
            out_us[part] = statistics.median(host_time_us(fn, device, calls) for _ in range(5))
    step = _attention_step(mod, q, x)
    step()
    out_us["whole forward+backward"] = statistics.median(host_time_us(step, device, calls) for _ in range(5))
    out_us["rest (autograd node, engine, loss)"] = max(
        0.0, out_us["whole forward+backward"] - sum(v for k, v in out_us.items() if k != "whole forward+backward"))
    return out_us


def parse_args(argv: Optional[List[str]] = None, check_device: bool = True):
    import argparse

    return common.parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--overhead", action="store_true", help=argparse.SUPPRESS),  # benches.proxy_attention's switch
        p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15, --quick 3)"),
        p.add_argument("--calls", type=int, default=None, help="calls per timed batch (default 200, --quick 20)"),
        p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: host cost, not parallelism)"),
    ), argv=argv, check_device=check_device)


def run(argv: Optional[List[str]] = None) -> common.Recorder:
    args = parse_args(argv)
    device = args.device
    torch.set_num_threads(args.threads)
    env = common.environment(device)
    rec = common.Recorder(OP, env)
    rounds = args.rounds or (3 if args.quick else 15)
    calls = args.calls or (20 if args.quick else 200)
    if rounds < 1 or calls < 1:
        raise SystemExit(f"--rounds and --calls must be >= 1, got {rounds} and {calls}")
    avail = icl_kernels.available_backends("proxy_attention", device, torch.float32)
    backends_here = [b for b in ("cpu", "cuda", "triton", "torch") if avail.get(b) is None]
    print(f"device: {env.device}; threads {torch.get_num_threads()}; backends {', '.join(backends_here)}; "
          f"{rounds} rounds of {calls} calls")
    dtype = torch.float32
    shapes = SHAPES[:1] if args.quick else SHAPES
    for shape in shapes:
        label = shape[0]
        steps = make_steps(shape, device, backends_here)
        for name, step in steps.items():
            ops = count_ops(step)
            total = sum(ops.values())
            launches = sum(v for k, v in ops.items() if k not in VIEW_OPS)
            rec.add(name, "fwd+bwd", label, dtype, "aten_ops", "count", (total, total, total))
            rec.add(name, "fwd+bwd", label, dtype, "aten_launch_ops", "count", (launches, launches, launches))
        times: Dict[str, List[float]] = {name: [] for name in steps}
        for _ in range(rounds):
            for name, step in steps.items():
                step()
                times[name].append(host_time_us(step, device, calls))
            print(".", end="", flush=True)
        for name, v in times.items():
            q = sorted(v)
            k = int(0.2 * (len(q) - 1))
            rec.add(name, "fwd+bwd", label, dtype, "host_time", "us", (statistics.median(v), q[k], q[-1 - k]))
        main_be = "cuda" if "cuda" in backends_here else backends_here[0]
        for part, share in profile_pieces(steps[f"icl-{main_be}"], device, calls).items():
            rec.add(f"icl-{main_be}:part={part}", "fwd+bwd", label, dtype, "share", "fraction", (share, share, share))
        for part, us in timed_pieces(shape, device, main_be, calls).items():
            rec.add(f"icl-{main_be}:piece={part}", "fwd+bwd", label, dtype, "piece_time", "us", (us, us, us))
    print()
    summarize(rec)
    rec.write_csv(args.csv)
    return rec


def summarize(rec: common.Recorder) -> None:
    got = {(r["shape"], r["provider"], r["metric"]): float(r["p50"]) for r in rec.rows if r["p50"]}
    shapes = sorted({s for s, _, _ in got})
    print(f"\nhost cost of one forward+backward ({rec.env.device}; ratio: against published, or memory-plain)")
    print(f"{'shape':<40} {'provider':<16} {'host us':>9} {'ratio':>7} {'ops':>5} {'launch':>7}")
    for s in shapes:
        provs = [p for (sh, p, m) in got if sh == s and m == "host_time"]
        for p in provs:
            base = "memory-plain" if p.startswith("memory") else "published"
            t = got[(s, p, "host_time")]
            ratio = t / got[(s, base, "host_time")] if (s, base, "host_time") in got else float("nan")
            print(f"{s:<40} {p:<16} {t:9.1f} {ratio:7.2f} {got.get((s, p, 'aten_ops'), 0):5.0f} "
                  f"{got.get((s, p, 'aten_launch_ops'), 0):7.0f}")
        parts = [(p, v) for (sh, p, m), v in got.items() if sh == s and m == "share"]
        if parts:
            print("  profiler shares: " + ", ".join(f"{p.split('=')[1]} {v:.0%}" for p, v in parts))
        pieces = [(p, v) for (sh, p, m), v in got.items() if sh == s and m == "piece_time"]
        if pieces:
            print(f"  pieces alone ({pieces[0][0].split(':')[0]}), us: " +
                  ", ".join(f"{p.split('=')[1]} {v:.1f}" for p, v in pieces))


def main(argv: Optional[List[str]] = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
