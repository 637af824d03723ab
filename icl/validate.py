"""One validation pass over a training configuration, before anything is trained or written.

The one place options are checked (the schema is :mod:`icl.config`; each method
adds its own ``check_config``). Three stages, each raising
:class:`~icl.errors.ConfigError` that names the option:

- :func:`check_types`: every value of a config file or dict has its field's type
  (``max_iterations: many`` is refused where it is read, not at iteration 0);
- :func:`check_config`: required options, choices (from their registries), the
  patch against the backbone registry, the method's own checks, ranges and
  lengths that need no data (workers, sizes, fractions, the device and the
  kernel backend this machine can run);
- :func:`check_against_data`: what needs the data set (``--spacing`` has one value
  per axis of its volumes, ``--slice-axis`` is one of those axes, the labeled subset
  leaves unlabeled items for a semi-supervised method, every listed file exists).
"""
from __future__ import annotations

import math
import os
import typing
from typing import Any, Dict, Optional, Sequence

from .errors import ConfigError, or_list

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _describe(t) -> str:
    origin = typing.get_origin(t)
    if t is int:
        return "an integer"
    if t is float:
        return "a number"
    if t is bool:
        return "true or false"
    if t is str:
        return "a string"
    if origin in (list, typing.List, Sequence, tuple):
        args = typing.get_args(t)
        return f"a list of {_describe(args[0]).replace('an ', '').replace('a ', '')}s" if args else "a list"
    if origin in (dict, typing.Dict):
        return "a mapping"
    if origin is typing.Union:
        return " or ".join(_describe(a) for a in typing.get_args(t) if a is not type(None))
    return str(t)


def _fits(value, t) -> bool:
    if t is Any:
        return True
    origin = typing.get_origin(t)
    if origin is typing.Union:
        return any(_fits(value, a) for a in typing.get_args(t))
    if t is type(None):
        return value is None
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return (isinstance(value, int) and not isinstance(value, bool)) or \
            (isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        args = typing.get_args(t)
        return isinstance(value, (list, tuple)) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is dict:
        args = typing.get_args(t)
        return isinstance(value, dict) and (not args or all(_fits(v, args[1]) for v in value.values()))
    return True  # a type this checker does not know: accept


def _non_none(t):
    if typing.get_origin(t) is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0] if len(args) == 1 else t
    return t


def check_types(cls, values: Dict, origin: str = "config") -> Dict:
    """Refuse values whose type differs from the field's annotation in dataclass ``cls``;
    integral floats are turned into ints for int fields. Returns the (converted) values."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for k, v in values.items():
        t = hints.get(k)
        if t is None or _fits(v, t):
            if _non_none(t) is int and isinstance(v, float):
                out[k] = int(v)
            continue
        raise ConfigError(f"{origin}: {k} ({_flag(k)}) must be {_describe(_non_none(t))}, got {v!r}")
    return out


# ------------------------------------------------------------------ devices


def resolve_device(value: Optional[str], flag: str = "--device"):
    """A torch.device this machine has: ``value`` (cpu, cuda, cuda:N) or the default (cuda if present)."""
    import torch

    if value in (None, ""):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(value))
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{flag} {value!r}: not a device; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {value}: no GPU is visible on this machine (torch.cuda.is_available() "
                              f"is False); use {flag} cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"{flag} {value}: this machine has {n} GPU(s) (cuda:0 .. cuda:{n - 1})")
    elif dev.type != "cpu":
        raise ConfigError(f"{flag} {value!r}: expected cpu, cuda or cuda:N")
    return dev


def check_backend(backend: Optional[str], device, amp: str = "none") -> None:
    """A kernel backend named explicitly must be able to run on ``device``, also on the tokens
    ``--amp`` makes (autocast hands the attention bfloat16/float16 tokens)."""
    if backend in (None, "auto"):
        return
    import icl_kernels

    reasons = icl_kernels.available_backends("proxy_attention", device)
    if backend not in reasons:
        raise ConfigError(f"--backend {backend!r}: expected auto or one of {', '.join(sorted(reasons))}")
    if reasons[backend] is not None:
        raise ConfigError(f"--backend {backend} cannot run on {device}: {reasons[backend]}; use --backend auto")
    from .inference import AMP_DTYPES

    dtype = AMP_DTYPES.get(amp)
    if dtype is not None:
        reason = icl_kernels.available_backends("proxy_attention", device, dtype)[backend]
        if reason is not None:
            raise ConfigError(f"--backend {backend} cannot run with --amp {amp}: {reason}; use --backend auto "
                              f"(it picks a backend that can) or --amp none")


#: the seeds every random generator of a run accepts (torch takes up to 2**64 - 1, NumPy's
#: generators any non-negative integer; a resume reseeds with seed + iteration)
SEED_RANGE = (0, 2 ** 63 - 1)


# ------------------------------------------------------------------ options


def _positive_list(cfg, name: str, length: Optional[int] = None) -> None:
    v = getattr(cfg, name)
    if v is None:
        return
    vals = list(v) if isinstance(v, (list, tuple)) else [v]
    flag = _flag(name)
    if length is not None and len(vals) != length:
        raise ConfigError(f"{flag} {' '.join(map(str, vals))}: give {length} values (one per spatial axis)")
    if not vals or any(not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0) for x in vals):
        raise ConfigError(f"{flag} {' '.join(map(str, vals))}: every value must be a positive number")


def check_choices(cfg) -> None:
    """Every option with choices (from its registry) holds one of them (cfg: an icl.config.TrainConfig)."""
    for name, spec in type(cfg).options():
        if spec.choices is None:
            continue
        value = getattr(cfg, name)
        if value is None:
            continue
        choices = tuple(spec.choices())
        if value not in choices:
            raise ConfigError(f"{spec.flag or _flag(name)} {value!r}: {spec.choice_error}expected one of "
                              f"{', '.join(choices)}")


def check_config(cfg) -> None:
    """The whole check of a TrainConfig before anything is read or written (fills the defaults that
    depend on other options: batch sizes)."""
    req = [("dataset", "--dataset"), ("root", "--root"), ("num_classes", "--num-classes"),
           ("patch_size", "--patch-size"), ("out", "--out")]
    for attr, flag in req:
        if getattr(cfg, attr) in (None, "", []):
            raise ConfigError(f"{flag} is required")
    check_choices(cfg)
    if not os.path.isdir(cfg.root):
        raise ConfigError(f"--root {cfg.root}: directory not found")
    if (cfg.labeled_num is None) == (cfg.labeled_fraction is None):
        raise ConfigError("give exactly one of --labeled-num and --labeled-fraction")
    _check_model(cfg)
    if int(cfg.num_classes) < 2:
        raise ConfigError(f"--num-classes must be at least 2 (background + one class), got {cfg.num_classes}")
    cfg.num_classes = int(cfg.num_classes)
    if cfg.batch_size is None:
        cfg.batch_size = 16 if cfg.spatial_dims == 2 else 4
    if cfg.labeled_bs is None:
        cfg.labeled_bs = cfg.batch_size // 2
    if cfg.labeled_bs <= 0 or cfg.labeled_bs > cfg.batch_size:
        raise ConfigError(f"--labeled-bs {cfg.labeled_bs} must be in 1..--batch-size ({cfg.batch_size})")
    from .methods import get_method

    try:
        get_method(cfg.method).check_config(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if cfg.max_iterations <= 0:
        raise ConfigError(f"--max-iterations must be positive, got {cfg.max_iterations}")
    if not 0.0 <= cfg.overlap < 1.0:
        raise ConfigError(f"--overlap must be in [0, 1), got {cfg.overlap}")
    from .data import IntensityAugment

    try:
        IntensityAugment.from_config(cfg.intensity_aug)
    except ValueError as exc:
        raise ConfigError(f"--intensity-aug: {exc}") from exc
    check_options(cfg)


def _check_model(cfg) -> None:
    """The patch against the backbone registry (icl.models.registry): dimensions, multiples, bottleneck."""
    from .models.registry import BACKBONES, arch_for

    cfg.patch_size = [int(p) for p in cfg.patch_size]
    sizes = " ".join(map(str, cfg.patch_size))
    dims = sorted({d for s in BACKBONES.values() if s.model_name == cfg.model for d in s.spatial_dims})
    if len(cfg.patch_size) not in dims:
        kinds = [f"{d} ({arch_for(cfg.model, d)})" for d in dims]
        raise ConfigError(f"--patch-size {sizes}: give {or_list(kinds)} sizes for --model {cfg.model}")
    spec = BACKBONES[cfg.arch]
    problem = spec.patch_problem(cfg.patch_size)
    if problem:
        raise ConfigError(f"--patch-size {sizes}: {problem}")
    if cfg.model_options and not spec.takes_options:
        raise ConfigError(f"model_options {cfg.model_options}: the {cfg.model} backbone takes none")


def check_options(cfg) -> None:
    """Ranges and lengths of a TrainConfig that need no data; also the device and backend."""
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    need(cfg.num_workers >= 0, f"--num-workers must be 0 or more, got {cfg.num_workers}")
    need(cfg.batch_size >= 1, f"--batch-size must be positive, got {cfg.batch_size}")
    need(cfg.val_every >= 0, f"--val-every must be 0 (never) or more, got {cfg.val_every}")
    need(cfg.save_every >= 0, f"--save-every must be 0 (only at the end) or more, got {cfg.save_every}")
    need(cfg.eval_batch_size >= 1, f"eval_batch_size must be positive, got {cfg.eval_batch_size}")
    need(cfg.num_overlays >= 0, f"num_overlays must be 0 or more, got {cfg.num_overlays}")
    need(math.isfinite(cfg.base_lr) and cfg.base_lr > 0, f"--base-lr must be a positive number, got {cfg.base_lr}")
    need(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
         f"--weight-decay must be 0 or more, got {cfg.weight_decay}")
    need(cfg.consistency_rampup >= 0, f"--consistency-rampup must be 0 or more, got {cfg.consistency_rampup}")
    need(0.0 < cfg.confidence_threshold <= 1.0,
         f"--confidence-threshold must be in (0, 1], got {cfg.confidence_threshold}")
    for name in ("val_fraction", "test_fraction"):
        v = getattr(cfg, name)
        need(0.0 < v < 1.0, f"{_flag(name)} must be in (0, 1), got {v}")
    if cfg.labeled_num is not None:
        need(cfg.labeled_num > 0, f"--labeled-num must be positive, got {cfg.labeled_num}")
    if cfg.labeled_fraction is not None:
        need(0.0 < cfg.labeled_fraction <= 1.0, f"--labeled-fraction must be in (0, 1], got {cfg.labeled_fraction}")
        if _uses_unlabeled(cfg) and cfg.labeled_fraction >= 1.0:
            raise ConfigError(f"--labeled-fraction {cfg.labeled_fraction} labels every training item; --method "
                              f"{cfg.method} needs unlabeled ones (use a fraction below 1, or --method supervised)")
    if cfg.slice_axis is not None:
        need(cfg.slice_axis in (0, 1, 2), f"--slice-axis {cfg.slice_axis}: expected 0, 1 or 2 (an axis of the volumes)")
    _positive_list(cfg, "spacing")
    _positive_list(cfg, "target_spacing", 3)
    if cfg.ct_window is not None:
        w = list(cfg.ct_window)
        need(len(w) == 2 and w[0] < w[1], f"--ct-window {' '.join(map(str, w))}: give LOW HIGH with LOW < HIGH")
    if cfg.cache_dir and os.path.exists(cfg.cache_dir) and not os.path.isdir(cfg.cache_dir):
        raise ConfigError(f"--cache-dir {cfg.cache_dir}: exists and is not a folder")
    if cfg.in_channels is not None:
        need(cfg.in_channels >= 1, f"--in-channels must be positive, got {cfg.in_channels}")
    if cfg.resume not in (None, False, "", "none") and getattr(cfg, "overwrite", False):
        raise ConfigError("--resume and --overwrite contradict each other: continue the run or replace it")
    lo, hi = SEED_RANGE
    need(lo <= cfg.seed <= hi, f"--seed must be in {lo}..2**63-1 (a non-negative 64-bit integer), got {cfg.seed}")
    device = resolve_device(cfg.device)
    from .methods import METHODS

    check_backend(cfg.backend, device, cfg.amp if METHODS[cfg.method].uses_kernels else "none")
    check_compile(getattr(cfg, "compile", "none"), device)


def check_compile(mode: str, device) -> None:
    """``--compile MODE`` must be able to do what it says on ``device`` (checked before any data is read,
    not minutes into the first iteration's compilation)."""
    if mode in (None, "none"):
        return
    if mode == "reduce-overhead" and device.type != "cuda":
        raise ConfigError(f"--compile reduce-overhead: its CUDA graphs need a GPU and this run is on {device}, "
                          f"where it would silently be --compile default; use --compile default or max-autotune")
    from .training import compile as compiled

    if compiled.COMPILE_BACKEND != "inductor":  # tests trace with aot_eager: no code generation
        return
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError(f"--compile {mode}: TorchInductor generates GPU code with Triton, which is not "
                              f"installed or cannot run here (pip install triton); use --compile none")
    else:
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except ImportError:  # an older torch: inductor reports a missing compiler itself
            pass
        except Exception as exc:
            raise ConfigError(f"--compile {mode}: TorchInductor compiles CPU code with a C++ compiler and found "
                              f"none ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); install g++ "
                              f"or set CXX, or use --compile none") from None


def check_against_data(cfg, source, splits) -> None:
    """What needs the data: axes of ``--spacing`` and ``--slice-axis``, unlabeled items, listed files."""
    dims = int(getattr(source, "volume_dims", 3))
    if cfg.spacing is not None and len(cfg.spacing) != dims:
        raise ConfigError(f"--spacing {' '.join(map(str, cfg.spacing))}: the volumes of {source.root} have {dims} "
                          f"axes; give {dims} values")
    if cfg.slice_axis is not None and not 0 <= int(cfg.slice_axis) < dims:
        raise ConfigError(f"--slice-axis {cfg.slice_axis}: the volumes of {source.root} have axes 0..{dims - 1}")
    n_unl = len(splits.items) - splits.num_labeled
    if _uses_unlabeled(cfg) and cfg.batch_size > cfg.labeled_bs and n_unl == 0:
        what = (f"--labeled-num {cfg.labeled_num}" if cfg.labeled_num is not None
                else f"--labeled-fraction {cfg.labeled_fraction}")
        raise ConfigError(f"{what} labels every training item of {source.root}; --method {cfg.method} needs "
                          f"unlabeled ones for the {cfg.batch_size - cfg.labeled_bs} unlabeled slots of each batch")
    missing = sorted({it.path for it in splits.items if not os.path.isfile(it.path)})
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ConfigError(f"{len(missing)} training file(s) listed for {source.root} do not exist: "
                          f"{', '.join(missing[:3])}{more}")


def _uses_unlabeled(cfg) -> bool:
    from .methods import METHODS

    m = METHODS.get(cfg.method)
    return m.uses_unlabeled if m is not None else cfg.method != "supervised"
