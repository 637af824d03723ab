"""Benchmark of one ICL training iteration (forward of both batches, the two
heads, the losses, backward and the optimiser step), eager and compiled, in
float32 and under bfloat16 autocast, with a breakdown of the eager step.

Run from a checkout:
    python -m benches.train_step [--quick] [--csv FILE] [--device cuda]
        [--configs acdc2d,brats3d] [--providers NAME,...] [--amp none,bf16]
        [--compile none,default,reduce-overhead,max-autotune] [--compile-backend inductor]
        [--attention-backend auto] [--no-breakdown]

Providers (the model; all ICLNet on the published UNet, SGD with momentum):
  published-formulation  the published model: faithful heads (two LayerNorms,
                         drop-path doubling, published head split), the spatial
                         MLP mixer, and the attention computed explicitly as the
                         published module does (every token projected)
  faithful-fused         the same faithful heads and MLP mixer, the attention on
                         the module's fused path (icl_kernels.ProxyAttention.forward):
                         only the attention differs from published-formulation
  icl-fused-mlp          icl's own heads (faithful=False) with the fused attention
                         and the published spatial MLP
  icl-default            what ``icl.models.build_model(arch, 1, K, patch)`` builds
                         with every option at its default, i.e. what ``icl train
                         --method icl`` trains (today: icl heads, the light conv
                         mixer, batch global queries, fused attention, backend
                         auto; the `model` info row lists the defaults read at run
                         time). Earlier CSVs call it ``icl-fused-conv`` (accepted as
                         an alias).

Step (what one timed call does): zero_grad; forward_train + icl_losses under
autocast (``--amp bf16``; ``none`` is float32); backward; SGD step; as ``icl
train`` does with ``--icl-views one --icl-passes split`` (its defaults).
``--compile MODE``: the forward+losses part goes through ``torch.compile(mode=MODE)``
(backward is the compiled backward graph; the optimiser step stays eager).
Compiled rows are made only from compiled code: dynamo's recompile limit is
raised, hitting it raises instead of falling back to eager, a recompile during
the timed calls raises, and the captured graphs and graph breaks are reported.
A failure (compile error, OOM, anything) becomes that row's status.

Rows (``mode``: ``eager`` or ``compile-<mode>``; with a non-inductor
``--compile-backend B``, ``compile-B``; ``dtype``: float32 for ``--amp none``,
bfloat16 for ``--amp bf16``):
  time         ms per iteration (p50, p20, p80 of the timed calls)
  peak_memory  MiB, torch.cuda.max_memory_allocated over one step (parameters,
               gradients and momentum included); on CPU an ``info: n/a`` row
  first_step   s, wall time of the first call (for compiled modes: tracing and
               compiling forward and backward, then one step)
  warmup       s, wall time of all untimed warm-up calls (first_step included)
  parameters   count; model / attention / compiled: ``info:`` rows saying which
               model ran, how many attention calls took the fused or the explicit
               path, and what dynamo captured
Breakdown rows (eager only; shape suffix ``part=...``): backbone, attention,
spatial_mixing, losses, optimizer; each timed alone (forward+backward) on inputs
captured from a real step, so the parts need not add up exactly to the step.
Rows go to the CSV after each (config, provider): a run stopped from outside
keeps what it measured.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from icl.losses import LossWeights, icl_losses
from icl.models import build_model
from icl.models.head import ClassDecoder

from . import common

OP = "train_step"

PROVIDERS = ["published-formulation", "faithful-fused", "icl-fused-mlp", "icl-default"]
ALIASES = {"icl-fused-conv": "icl-default"}
COMPILE_MODES = ["none", "default", "reduce-overhead", "max-autotune"]
AMPS = {"none": torch.float32, "bf16": torch.bfloat16}
ATTENTION_BACKENDS = ["auto", "torch", "cpu", "triton", "cuda"]

# name -> (arch, patch, labeled batch, unlabeled batch, classes, reduced)
CONFIGS: Dict[str, Tuple[str, Tuple[int, ...], int, int, int, bool]] = {
    "acdc2d": ("unet2d", (256, 256), 8, 8, 4, False),        # the paper's 2D setting
    "brats3d": ("unet3d", (96, 96, 96), 2, 2, 2, False),     # the 3D setting
    "acdc2d-reduced": ("unet2d", (128, 128), 4, 4, 4, True),
    "brats3d-reduced": ("unet3d", (48, 48, 48), 1, 1, 2, True),
    "quick2d": ("unet2d", (32, 32), 1, 1, 3, True),          # smoke runs and tests
}
DEFAULT_CONFIGS = ["acdc2d", "brats3d", "acdc2d-reduced", "brats3d-reduced"]
QUICK_CONFIGS = ["quick2d"]
WARMUP_CALLS = 3  # untimed steps before timing; the first compiles, reduce-overhead records graphs on later ones


# -- command line ----------------------------------------------------------------
def _list(value: str) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _extra_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", default=None,
                   help=f"comma list of {', '.join(CONFIGS)} (default: {','.join(DEFAULT_CONFIGS)}; --quick: quick2d)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {', '.join(PROVIDERS)}")
    p.add_argument("--amp", nargs="+", default=None,
                   help="none (float32) and/or bf16 (bfloat16 autocast), comma list or several values "
                        "(default: from --dtype: float32 -> none, bfloat16 -> bf16)")
    p.add_argument("--compile", nargs="+", default=["none"], dest="compile_modes",
                   help=f"{', '.join(COMPILE_MODES)}; comma list or several values (default none: eager only)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (default inductor; aot_eager or eager for cheap checks: "
                        "only --compile default then)")
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="backend of the fused attention (default auto, as icl train)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-part timing of the eager step")


def _split_values(values: Sequence[str]) -> List[str]:
    out: List[str] = []
    for v in values:
        out += _list(v)
    return out


def parse_args(argv: Optional[Sequence[str]] = None, check_device: bool = True) -> argparse.Namespace:
    """Parse and check a command line; ``check_device=False`` accepts --device cuda without a GPU."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = common.parse_args(__doc__.splitlines()[0], _extra_args, argv, check_device=check_device)

    def fail(msg: str):
        raise SystemExit(f"benches.train_step: error: {msg}")

    configs = _list(args.configs) if args.configs is not None else (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)
    bad = [c for c in configs if c not in CONFIGS]
    if bad or not configs:
        fail(f"--configs: unknown {bad or 'empty list'}; expected a comma list of {', '.join(CONFIGS)}")
    args.configs = configs
    provs = [ALIASES.get(p, p) for p in _list(args.providers)]
    bad = [p for p in provs if p not in PROVIDERS]
    if bad or not provs:
        fail(f"--providers: unknown {bad or 'empty list'}; expected a comma list of {', '.join(PROVIDERS)}")
    args.providers = list(dict.fromkeys(provs))
    dtype_given = any(a == "--dtype" or a.startswith("--dtype=") for a in argv)
    if args.amp is not None:
        if dtype_given:
            fail("--amp and --dtype both given; --amp none,bf16 says which precisions to run")
        amps = _split_values(args.amp)
        bad = [a for a in amps if a not in AMPS]
        if bad or not amps:
            extra = " (fp16 needs a GradScaler; this benchmark measures none and bf16)" if "fp16" in bad else ""
            fail(f"--amp: unknown {bad or 'empty list'}; expected none and/or bf16{extra}")
    else:
        by_dtype = {torch.float32: "none", torch.bfloat16: "bf16"}
        if args.dtype not in by_dtype:
            fail(f"--dtype {str(args.dtype).replace('torch.', '')}: expected float32 or bfloat16 (or use --amp)")
        amps = [by_dtype[args.dtype]]
    args.amps = list(dict.fromkeys(amps))
    modes = _split_values(args.compile_modes)
    bad = [m for m in modes if m not in COMPILE_MODES]
    if bad or not modes:
        fail(f"--compile: unknown {bad or 'empty list'}; expected {', '.join(COMPILE_MODES)}")
    args.compile_modes = list(dict.fromkeys(modes))
    if args.compile_backend != "inductor":
        import torch._dynamo as dynamo

        known = dynamo.list_backends(None)
        if args.compile_backend not in known:
            fail(f"--compile-backend {args.compile_backend!r}: expected one of {', '.join(sorted(known))}")
        odd = [m for m in args.compile_modes if m not in ("none", "default")]
        if odd:
            fail(f"--compile {','.join(odd)}: modes are inductor options; with --compile-backend "
                 f"{args.compile_backend} use --compile default")
    return args


def mode_name(compile_mode: str, backend: str) -> str:
    """The CSV ``mode`` of a compile mode."""
    if compile_mode == "none":
        return "eager"
    return f"compile-{compile_mode}" if backend == "inductor" else f"compile-{backend}"


def config_label(name: str) -> str:
    arch, patch, lb, ub, classes, reduced = CONFIGS[name]
    shape = common.shape_str(cfg=name, B=f"{lb}+{ub}", patch="x".join(map(str, patch)), K=classes)
    return shape + (";reduced=1" if reduced and name != "quick2d" else "")


def matrix(args: argparse.Namespace) -> List[Tuple[str, str, str, str]]:
    """(config label, provider, dtype name, CSV mode) of every measurement the arguments ask for, in run order."""
    return [(config_label(c), p, str(AMPS[a]).replace("torch.", ""), mode_name(m, args.compile_backend))
            for c in args.configs for p in args.providers for a in args.amps for m in args.compile_modes]


# -- models ------------------------------------------------------------------------
def default_model_options() -> Dict[str, object]:
    """build_model's defaults for the head options (what icl-default gets)."""
    sig = inspect.signature(build_model)
    names = ("mixer", "global_queries", "faithful", "backend", "max_mixer_params")
    return {n: sig.parameters[n].default for n in names if n in sig.parameters}


def describe(provider: str, attention_backend: str) -> str:
    be = f"backend {attention_backend}"
    if provider == "published-formulation":
        return "faithful heads, mixer=mlp, global_queries=batch, attention explicit (published computation)"
    if provider == "faithful-fused":
        return f"faithful heads, mixer=mlp, global_queries=batch, attention fused ({be})"
    if provider == "icl-fused-mlp":
        return f"icl heads (faithful=False), mixer=mlp, global_queries=batch, attention fused ({be})"
    opts = ", ".join(f"{k}={v}" for k, v in default_model_options().items())
    return f"build_model defaults ({opts}); attention {be}"


def mlp_params(arch: str, patch: Tuple[int, ...]) -> int:
    """Parameters of the published spatial MLP mixers in the two heads."""
    fracs = (8, 4, 2) if arch == "unet2d" else (16, 8, 4)
    total = 0
    for f in fracs:
        n = 1
        for p in patch:
            n *= p // f
        total += 2 * n * n + 2 * n + 2 * n  # Linear(N,N) x2 + biases + LayerNorm(N)
    return 2 * total


def _attention_modules(model) -> List[torch.nn.Module]:
    return [m.attn for m in model.modules() if isinstance(m, ClassDecoder)]


def make_model(provider: str, arch: str, patch, classes: int, device, attention_backend: str = "auto"):
    backend = None if attention_backend == "auto" else attention_backend
    with torch.device(device):  # parameters made on the device (the 2D MLP mixers hold ~1e9)
        if provider == "icl-default":
            model = build_model(arch, 1, classes, patch, backend=backend)  # every other option at its default
        else:
            faithful = provider in ("published-formulation", "faithful-fused")
            model = build_model(arch, 1, classes, patch, mixer="mlp", global_queries="batch", faithful=faithful,
                                backend=backend, max_mixer_params=None)
    if provider == "published-formulation":
        for attn in _attention_modules(model):
            attn.forward = attn.forward_explicit  # project every token, as published
    return model.to(device).train()


def attention_paths(model, run: Callable[[], object]) -> Tuple[int, int]:
    """(calls, explicit calls) of the attention modules during ``run()`` (eager)."""
    counts = {"calls": 0, "explicit": 0}
    undo = []
    for attn in _attention_modules(model):
        orig = attn.forward_explicit

        def counting(*a, _orig=orig, **k):
            counts["explicit"] += 1
            return _orig(*a, **k)

        had_forward = "forward" in attn.__dict__
        saved = attn.__dict__.get("forward")
        attn.forward_explicit = counting
        if had_forward:  # the published provider: forward is forward_explicit itself
            attn.forward = counting
        hook = attn.register_forward_pre_hook(lambda *_: counts.__setitem__("calls", counts["calls"] + 1))
        undo.append((attn, had_forward, saved, hook))
    try:
        run()
    finally:
        for attn, had_forward, saved, hook in undo:
            hook.remove()
            del attn.__dict__["forward_explicit"]
            if had_forward:
                attn.forward = saved
    return counts["calls"], counts["explicit"]


def _forward_losses(model, x_lab, x_unlab, y_lab, classes: int, weights, device_type: str, amp_dtype):
    """forward_train + icl_losses under autocast: the part of the step that --compile compiles."""
    with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
        out = model.forward_train(x_lab, x_unlab, y_lab)
        losses = icl_losses(out, y_lab, classes, weights)
    return out, losses


def _raise_dynamo_limits() -> None:
    """Each (config, provider, precision) is a fresh model: its compile must not count
    against dynamo's recompile limit, past which dynamo would run the code eagerly
    and the "compile" rows would time eager code; hitting the limit raises here."""
    import torch._dynamo.config as dc

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), 64))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), 1024))
    if hasattr(dc, "fail_on_recompile_limit_hit"):
        dc.fail_on_recompile_limit_hit = True


class Step:
    def __init__(self, provider, arch, patch, lb, ub, classes, device, attention_backend="auto"):
        self.model = make_model(provider, arch, patch, classes, device, attention_backend)
        g = torch.Generator().manual_seed(0)
        self.x_lab = torch.randn(lb, 1, *patch, generator=g).to(device)
        self.x_unlab = torch.randn(ub, 1, *patch, generator=g).to(device)
        self.y_lab = torch.randint(0, classes, (lb, *patch), generator=g).to(device)
        self.classes = classes
        self.weights = LossWeights.published(len(patch))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.device = device
        self.dtype = torch.float32
        self.fn = _forward_losses
        self.cudagraph_steps = False

    def use(self, amp_dtype, compiled: Optional[Callable] = None, cudagraph_steps: bool = False) -> None:
        self.dtype = amp_dtype
        self.fn = compiled or _forward_losses
        self.cudagraph_steps = cudagraph_steps

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def losses(self):
        return self.fn(self.model, self.x_lab, self.x_unlab, self.y_lab, self.classes, self.weights,
                       self.device.type, self.dtype)

    def step(self):
        if self.cudagraph_steps:  # reduce-overhead: a new iteration may overwrite the last one's graph outputs
            torch.compiler.cudagraph_mark_step_begin()
        self.opt.zero_grad(set_to_none=True)
        _, losses = self.losses()
        losses["total"].backward()
        self.opt.step()

    # -- breakdown (eager) ------------------------------------------------------------
    def capture(self):
        """Inputs of every attention and mixer call, and the outputs, from one step."""
        calls = {"attention": [], "spatial_mixing": []}
        hooks = []
        for m in self.model.modules():
            if isinstance(m, ClassDecoder):
                hooks.append(m.attn.register_forward_pre_hook(
                    lambda mod, args, m=m: calls["attention"].append((mod, [a.detach() for a in args]))))
                mixer = m.mlp2 if m.mixer_kind == "mlp" else m.mixer
                pre = m.norm3 if m.mixer_kind == "mlp" else None

                def hook(mod, args, pre=pre, mixer=mixer):
                    calls["spatial_mixing"].append(((pre, mixer), [a.detach() for a in args]))

                hooks.append((pre or mixer).register_forward_pre_hook(hook))
        try:
            out, _ = _forward_losses(self.model, self.x_lab, self.x_unlab, self.y_lab, self.classes, self.weights,
                                     self.device.type, self.dtype)
        finally:
            for h in hooks:
                h.remove()
        self.outputs = out
        return calls

    def part_fns(self) -> Dict[str, Callable]:
        calls = self.capture()
        model = self.model

        def attention():
            for mod, args in calls["attention"]:
                args = [a.clone().requires_grad_() for a in args]
                with self._autocast():
                    out, attn = mod(*args)
                (out.float().square().mean() + attn.float().square().mean()).backward()

        def mixing():
            for (pre, mixer), args in calls["spatial_mixing"]:
                x = args[0].clone().requires_grad_()
                with self._autocast():
                    y = mixer(pre(x)) if pre is not None else mixer(x)
                y.float().square().mean().backward()

        def backbone():
            with self._autocast():
                a, fa = model.backbone(self.x_lab, return_features=True)
                b, fb = model.backbone(self.x_unlab, return_features=True)
            loss = a.float().mean() + b.float().mean() + sum(f.float().mean() for f in fa + fb)
            loss.backward()

        def losses():
            o = self.outputs
            leaf = lambda t: t.detach().clone().requires_grad_()
            out = type(o)(**{k: ([leaf(t) for t in v] if isinstance(v, list) else (leaf(v) if torch.is_tensor(v) else v))
                             for k, v in vars(o).items()})
            with self._autocast():
                total = icl_losses(out, self.y_lab, self.classes, self.weights)["total"]
            total.backward()

        def optimizer():
            self.opt.step()

        self.step()  # grads exist for the optimiser part
        return {"backbone": backbone, "attention": attention, "spatial_mixing": mixing, "losses": losses,
                "optimizer": optimizer}


# -- measuring ----------------------------------------------------------------------
def peak_step_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """torch.cuda.max_memory_allocated over one call, in MiB (what the step needs in all); None on CPU."""
    if device.type != "cuda":
        return None
    common.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    common.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _wall(fn: Callable[[], object], device: torch.device) -> float:
    common.synchronize(device)
    t0 = time.perf_counter()
    fn()
    common.synchronize(device)
    return time.perf_counter() - t0


def _dynamo_counts() -> Tuple[int, int, List[str]]:
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    return int(counters["stats"]["unique_graphs"]), int(sum(breaks.values())), list(breaks)


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(rec: common.Recorder, st: Step, shape: str, prov: str, amp: str, compile_mode: str,
            args: argparse.Namespace, reps: Dict[str, int]) -> str:
    """Rows of one (config, provider, precision, mode); returns a one-line log of what happened."""
    device = args.device
    dtype = AMPS[amp]
    mode = mode_name(compile_mode, args.compile_backend)
    compiled = None
    what = "eager step"
    if compile_mode != "none":
        import torch._dynamo as dynamo
        from torch._dynamo.utils import counters

        dynamo.reset()  # a fresh cache per model: no recompiles inherited from earlier rows
        counters.clear()
        _raise_dynamo_limits()
        kw = {"backend": args.compile_backend}
        if args.compile_backend == "inductor":
            kw["mode"] = compile_mode
        compiled = torch.compile(_forward_losses, **kw)
        what = f"torch.compile({', '.join(f'{k}={v}' for k, v in kw.items())})"
    st.use(dtype, compiled, cudagraph_steps=compile_mode in ("reduce-overhead", "max-autotune") and device.type == "cuda")
    try:
        first = _wall(st.step, device)
    except Exception as exc:  # noqa: BLE001 - the row says what failed
        reason = common.error_reason(exc)
        if compiled is not None and reason.startswith("error"):
            reason = f"error: {what} failed: {reason[len('error: '):]}"
        rec.add(prov, mode, shape, dtype, "time", reason)
        return reason
    warm = first
    for _ in range(WARMUP_CALLS - 1):
        warm += _wall(st.step, device)
    if compiled is not None:
        graphs, breaks, reasons = _dynamo_counts()
        if graphs == 0:
            reason = f"error: {what} captured no graph: the step ran eagerly"
            rec.add(prov, mode, shape, dtype, "time", reason)
            return reason
        note = f"info: dynamo captured {graphs} graph(s), {breaks} graph break(s)"
        if reasons:
            note += f" (first: {reasons[0].splitlines()[0][:100]})"
        if st.cudagraph_steps:  # CUDA graphs may be skipped per graph (the reason is in the log): say so
            from torch._dynamo.utils import counters

            note += f"; CUDA graphs skipped for {int(counters['inductor']['cudagraph_skips'])} graph(s)"
        rec.add(prov, mode, shape, dtype, "compiled", note)
    if compiled is not None:
        import torch._dynamo.config as dc

        with dc.patch(error_on_recompile=True):  # timed calls run the compiled code, nothing else
            vals = common.time_fn(st.step, device, args.min_time, warmup=1, **reps)
            mem = peak_step_mib(st.step, device)
    else:
        vals = common.time_fn(st.step, device, args.min_time, warmup=1, **reps)
        mem = peak_step_mib(st.step, device)
    rec.add(prov, mode, shape, dtype, "time", "ms", vals)
    if mem is not None:
        rec.add(prov, mode, shape, dtype, "peak_memory", "MiB", (mem, mem, mem))
    else:
        rec.add(prov, mode, shape, dtype, "peak_memory", f"info: n/a on {device.type} (no allocator statistics)")
    rec.add(prov, mode, shape, dtype, "first_step", "s", (first, first, first))
    rec.add(prov, mode, shape, dtype, "warmup", "s", (warm, warm, warm))
    line = f"{vals[0]:.2f} ms/iter"
    if mem is not None:
        line += f", peak {mem:.0f} MiB"
    line += f", first step {first:.1f} s, warm-up {warm:.1f} s"
    if compile_mode == "none" and not args.no_breakdown:
        for part, fn in st.part_fns().items():
            pv = common.time_fn(fn, device, args.min_time, **reps)
            rec.add(prov, mode, f"{shape};part={part}", dtype, "time", "ms", pv)
    return line


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    device = args.device
    env = common.environment(device)
    rec = common.Recorder(OP, env)
    mem_limit = None
    if device.type == "cpu":
        try:
            mem_limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            mem_limit = None
    # --quick is a smoke run: one warm-up and three timed calls per measurement
    reps = dict(min_samples=3) if args.quick else {}
    written = 0

    def flush():
        nonlocal written
        if args.csv and len(rec.rows) > written:
            common.Recorder(OP, env, rec.rows[written:]).write_csv(args.csv)
        written = len(rec.rows)

    for cfg in args.configs:
        arch, patch, lb, ub, classes, reduced = CONFIGS[cfg]
        shape = config_label(cfg)
        for prov in args.providers:
            dtypes = [AMPS[a] for a in args.amps]
            modes = [mode_name(m, args.compile_backend) for m in args.compile_modes]
            need = mlp_params(arch, patch) * 4 * 3 if prov != "icl-default" else 0  # params + grads + momentum
            skip = None
            if device.type == "cpu" and not reduced and need:
                skip = (f"skipped: the spatial MLP needs {need / 2**30:.1f} GiB for parameters, gradients and "
                        "momentum (more than half of this machine's memory with activations); see the reduced shape")
            elif mem_limit is not None and need > 0.6 * mem_limit:
                skip = "oom"
            if skip:
                for dt in dtypes:
                    for mode in modes:
                        rec.add(prov, mode, shape, dt, "time", skip)
                flush()
                continue
            try:
                st = Step(prov, arch, patch, lb, ub, classes, device, args.attention_backend)
            except Exception as exc:  # noqa: BLE001
                reason = common.error_reason(exc)
                for dt in dtypes:
                    for mode in modes:
                        rec.add(prov, mode, shape, dt, "time", reason)
                print(f"[train_step] {shape} {prov}: model not built: {reason}", flush=True)
                _cleanup(device)
                flush()
                continue
            params = sum(p.numel() for p in st.model.parameters())
            rec.add(prov, "eager", shape, torch.float32, "parameters", "count", (params, params, params))
            rec.add(prov, "eager", shape, torch.float32, "model", f"info: {describe(prov, args.attention_backend)}")
            for amp in args.amps:
                dtype = AMPS[amp]
                try:
                    st.use(dtype)
                    calls, explicit = attention_paths(st.model, st.step)
                    rec.add(prov, "eager", shape, dtype, "attention",
                            f"info: {calls - explicit} of {calls} attention calls fused, {explicit} explicit")
                except Exception as exc:  # noqa: BLE001 - the modes below will say it again, per row
                    rec.add(prov, "eager", shape, dtype, "attention", f"info: not probed ({common.error_reason(exc)})")
                for cm in args.compile_modes:
                    mode = mode_name(cm, args.compile_backend)
                    try:
                        line = measure(rec, st, shape, prov, amp, cm, args, reps)
                    except Exception as exc:  # noqa: BLE001 - a failure is the row's status
                        line = common.error_reason(exc)
                        rec.add(prov, mode, shape, dtype, "time", line)
                        _cleanup(device)
                    print(f"[train_step] {shape} {prov} {str(dtype).replace('torch.', '')} {mode}: {line}", flush=True)
                    flush()
            del st
            if any(m != "none" for m in args.compile_modes):
                import torch._dynamo as dynamo

                dynamo.reset()
            _cleanup(device)
    print_table(rec)
    flush()


def print_table(rec: common.Recorder) -> None:
    """The time rows, with the peak memory and first-step time of the same measurement."""
    key = lambda r: (r["provider"], r["mode"], r["shape"], r["dtype"])
    other = {(key(r), r["metric"]): r["p50"] for r in rec.rows if r["metric"] in ("peak_memory", "first_step")}
    rows = [r for r in rec.rows if r["metric"] == "time"]
    if not rows:
        return
    print(f"\n{OP} on {rec.env.device} (torch {rec.env.torch_version}, triton {rec.env.triton_version or '-'})")
    header = (f"{'shape':<44} {'dtype':<9} {'mode':<24} {'provider':<22} {'ms p50':>9} {'p20':>9} {'p80':>9} "
              f"{'peak MiB':>9} {'first s':>8}  unit")
    print(header)
    print("-" * len(header))
    for r in rows:
        mem, first = other.get((key(r), "peak_memory"), ""), other.get((key(r), "first_step"), "")
        print(f"{r['shape']:<44} {r['dtype']:<9} {r['mode']:<24} {r['provider']:<22} {r['p50']:>9} {r['p20']:>9} "
              f"{r['p80']:>9} {mem:>9} {first:>8}  {r['unit']}")


if __name__ == "__main__":
    main()
