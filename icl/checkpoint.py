"""Checkpoints: atomic writes, safe loading, compatibility checks, export.

A training checkpoint is a dict of plain types and tensors (loadable with
``torch.load(..., weights_only=True)``)::

    format: "icl-checkpoint", version: 1, kind: "train" | "weights"
    model_config: {arch, backbone_options, in_channels, num_classes, patch_size, mixer, global_queries,
                   faithful, method}
    data_config:  {dataset, preprocessing: {...}, spacing, interpolation}
    model: state_dict (the ICLNet for method "icl", the bare backbone for every other method)
    method_state: extra state of the method in training checkpoints (Mean Teacher: the EMA teacher)
    iteration, best, config (the run's full config)
    kind "train" only: optimizer, scaler, rng (per rank), sampler

An exported backbone is a plain state_dict of the backbone (``UNet2D(...).load_state_dict(
torch.load(f, weights_only=True))`` works); its ``_metadata["__icl__"]`` entry keeps the
model and data config so that ``icl predict`` can use it too.
"""
from __future__ import annotations

import os
import random
from collections import OrderedDict
from typing import Any, Dict, Optional

import numpy as np
import torch

from .errors import UsageError

FORMAT = "icl-checkpoint"
VERSION = 1
META_KEY = "__icl__"
MODEL_KEYS = ("arch", "backbone_options", "in_channels", "num_classes", "patch_size", "mixer", "global_queries", "faithful", "method")


class CheckpointError(UsageError):
    """A checkpoint is missing, unreadable, or does not fit the model/run; the message says what differs."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a vanished folder); the previous one stands."""


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_atomic(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``: a save that
    fails (a full disk) leaves the previous file whole, and says so."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        raise CheckpointWriteError(_write_failure(path, d, obj, exc)) from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_failure(path: str, folder: str, obj: Any, exc: BaseException) -> str:
    import errno
    import shutil

    need = _tensor_bytes(obj)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    before = (f"the previous {os.path.basename(path)} is intact" if os.path.isfile(path)
              else f"no earlier {os.path.basename(path)} was there")
    full = getattr(exc, "errno", None) == errno.ENOSPC or (free is not None and free < need * 1.1)
    if full:
        have = f"{free / 2 ** 20:.0f} MB free" if free is not None else "free space unknown"
        return (f"cannot write {path}: the disk holding {folder} is full ({have}, the checkpoint needs about "
                f"{need / 2 ** 20:.0f} MB); {before}. Free space there (or choose another --out) and resume")
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"cannot write {path} ({first}); {before}"


def load(path: str) -> Dict:
    """Load an icl checkpoint or exported backbone safely (weights_only=True).

    Returns a checkpoint dict; an exported backbone is returned as
    {format, kind: "backbone", model_config, data_config, model}.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load checkpoint safely ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if int(obj.get("version", 0)) > VERSION:
            raise CheckpointError(f"{path}: checkpoint version {obj.get('version')} is newer than this icl ({VERSION})")
        obj["path"] = path
        check_settings(obj, path)
        return obj
    meta = getattr(obj, "_metadata", None)
    if isinstance(obj, dict) and meta is not None and META_KEY in meta:
        info = meta[META_KEY]
        state = OrderedDict((k, v) for k, v in obj.items())
        ck = {"format": FORMAT, "version": VERSION, "kind": "backbone", "path": path,
              "model_config": dict(info.get("model_config", {})),
              "data_config": dict(info.get("data_config", {})), "model": state,
              "iteration": info.get("iteration"), "config": dict(info.get("config", {}))}
        check_settings(ck, path)
        return ck
    raise CheckpointError(
        f"{path}: not an icl checkpoint (no 'format': '{FORMAT}' entry); published ICL state dicts can be "
        f"loaded with ICLNet.load_published_state_dict"
    )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_settings(ckpt: Dict, path: str) -> None:
    """What a checkpoint carries is checked as strictly as the command line: a damaged or hostile
    model_config / data_config is refused naming the checkpoint and the field."""
    from .data.transforms import INTERPOLATIONS
    from .models.registry import BACKBONES

    def bad(field: str, value, expected: str):
        raise CheckpointError(f"{path}: {field} {value!r} in the checkpoint: expected {expected}")

    mc = ckpt.get("model_config")
    if not isinstance(mc, dict):
        bad("model_config", mc, "a mapping")
    arch = mc.get("arch")
    if arch not in BACKBONES:
        bad("model_config.arch", arch, f"one of {', '.join(BACKBONES)}")
    spec = BACKBONES[arch]
    if not (_is_int(mc.get("in_channels")) and mc["in_channels"] >= 1):
        bad("model_config.in_channels", mc.get("in_channels"), "a positive integer")
    if not (_is_int(mc.get("num_classes")) and mc["num_classes"] >= 2):
        bad("model_config.num_classes", mc.get("num_classes"), "an integer of at least 2")
    patch = mc.get("patch_size")
    if patch is not None:
        if not (isinstance(patch, (list, tuple)) and all(_is_int(p) for p in patch)):
            bad("model_config.patch_size", patch, "a list of integers")
        problem = spec.patch_problem(patch)
        if problem:
            bad("model_config.patch_size", patch, problem)
    opts = mc.get("backbone_options")
    if opts is not None and not isinstance(opts, dict):
        bad("model_config.backbone_options", opts, "a mapping")
    dc = ckpt.get("data_config") or {}
    if not isinstance(dc, dict):
        bad("data_config", dc, "a mapping")
    prep = dc.get("preprocessing") or {}
    if not isinstance(prep, dict):
        bad("data_config.preprocessing", prep, "a mapping")
    axis = prep.get("slice_axis")
    if axis is not None and axis not in (0, 1, 2):
        bad("data_config.preprocessing.slice_axis", axis, "0, 1 or 2 (an axis of the volumes)")
    interp = dc.get("interpolation")
    if interp is not None and interp not in INTERPOLATIONS:
        bad("data_config.interpolation", interp, " or ".join(INTERPOLATIONS))


def describe_mismatch(stored: Dict, wanted: Dict, keys=MODEL_KEYS) -> Optional[str]:
    diffs = []
    for k in keys:
        if k in wanted and wanted[k] is not None and k in stored:
            a, b = stored[k], wanted[k]
            if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
                a, b = list(a), list(b)
            if a != b:
                diffs.append(f"{k}={stored[k]!r} in the checkpoint but {wanted[k]!r} here")
    return "; ".join(diffs) or None


def check_compatible(ckpt: Dict, model_config: Dict, keys=MODEL_KEYS) -> None:
    msg = describe_mismatch(ckpt.get("model_config", {}), model_config, keys)
    if msg:
        raise CheckpointError(f"{ckpt.get('path', 'checkpoint')}: does not fit this model: {msg}")


COMPILED_PREFIX = "_orig_mod."  # what torch.compile(module) puts before the keys of the module it wraps


def strip_compiled_prefix(state: Dict, own_keys) -> Dict:
    """``state`` without torch.compile's ``_orig_mod.`` key segments when the module's own keys have none
    (a state_dict saved from a compiled module loads into the plain one; icl's trainer compiles a
    function, so its own checkpoints never carry the prefix)."""
    if not any(COMPILED_PREFIX in k for k in state) or any(COMPILED_PREFIX in k for k in own_keys):
        return state
    out = OrderedDict((k.replace(COMPILED_PREFIX, ""), v) for k, v in state.items())
    if len(out) != len(state):  # two keys would become one: leave the mismatch to be reported
        return state
    return out


def load_state(module: torch.nn.Module, state: Dict, what: str = "checkpoint") -> None:
    """load_state_dict(strict) with a message listing missing/unexpected keys and shape differences."""
    own = module.state_dict()
    state = strip_compiled_prefix(state, own)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"shapes differ (checkpoint vs model) for {shapes[:4]}{' ...' if len(shapes) > 4 else ''}")
        if missing:
            parts.append(f"missing keys {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
        raise CheckpointError(f"{what}: does not fit the model: " + "; ".join(parts))
    check_finite_state(state, what)
    module.load_state_dict(state, strict=True)


def check_finite_state(state: Dict, what: str = "checkpoint") -> None:
    """Refuse weights holding NaN/Inf: such a network predicts one class everywhere without a word."""
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            bad = int(v.numel() - torch.isfinite(v).sum())
            raise CheckpointError(f"{what}: tensor {k!r} holds {bad} NaN/Inf value(s); the checkpoint is damaged "
                                  f"or its run diverged")


def backbone_state(ckpt: Dict) -> Dict[str, torch.Tensor]:
    """The backbone's own state dict from a full, supervised or exported checkpoint."""
    state = ckpt["model"]
    if ckpt.get("kind") == "backbone" or ckpt.get("model_config", {}).get("method", "icl") != "icl":
        return OrderedDict(state)
    return OrderedDict((k[len("backbone."):], v) for k, v in state.items() if k.startswith("backbone."))


def build_backbone(model_config: Dict) -> torch.nn.Module:
    from .models import BACKBONES
    from .models import build_backbone as build

    arch = model_config.get("arch")
    if arch not in BACKBONES:
        raise CheckpointError(f"checkpoint model_config has unknown arch {arch!r}")
    return build(arch, int(model_config["in_channels"]), int(model_config["num_classes"]),
                 model_config.get("patch_size") or None, **(model_config.get("backbone_options") or {}))


def backbone_from_checkpoint(ckpt: Dict, num_classes: Optional[int] = None,
                             in_channels: Optional[int] = None) -> torch.nn.Module:
    """The inference network (the bare backbone) with the checkpoint's weights, in eval mode; it
    carries the training patch and the run's 2D resampling mode for ``icl.predict``."""
    mc = ckpt.get("model_config", {})
    check_compatible(ckpt, {"num_classes": num_classes, "in_channels": in_channels})
    net = build_backbone(mc)
    load_state(net, backbone_state(ckpt), what=ckpt.get("path", "checkpoint"))
    from .models import set_patch_size

    if mc.get("patch_size"):
        set_patch_size(net, mc["patch_size"])
    net.icl_interpolation = (ckpt.get("data_config") or {}).get("interpolation") or "linear"
    net.eval()
    return net


def export_backbone(ckpt: Dict, out_path: str) -> None:
    """Write a backbone-only state dict (plain UNet keys) with the icl config in its metadata."""
    state = backbone_state(ckpt)
    net = build_backbone(ckpt["model_config"])
    load_state(net, state, what=ckpt.get("path", "checkpoint"))  # validates before writing
    sd = net.state_dict()
    sd._metadata[META_KEY] = {
        "model_config": dict(ckpt.get("model_config", {})),
        "data_config": dict(ckpt.get("data_config", {})),
        "iteration": ckpt.get("iteration"),
    }
    save_atomic(sd, out_path)


# ------------------------------------------------------------------- RNG states


def rng_state() -> Dict:
    """Python, numpy and torch (CPU + CUDA) generator states as weights_only-safe values."""
    st = {"python": random.getstate()}
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    st["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    st["torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except (RuntimeError, IndexError):
            pass
