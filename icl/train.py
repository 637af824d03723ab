"""The ICL trainer (and a supervised-only baseline on the same backbone and batches).

``train(config)`` runs a whole experiment into ``config.out``:

- ``config.yaml`` (the resolved configuration), ``splits.json`` (which cases are
  labeled, validation, test, and where each split came from);
- ``log.csv`` (one row per iteration: learning rate, losses, it/s),
  ``tensorboard/`` (the same scalars and the validation Dice);
- ``checkpoints/last.pt`` (every ``save_every`` iterations, at the end, and on
  SIGINT/SIGTERM), ``checkpoints/best.pt`` (best validation mean Dice);
- ``metrics.json``: config, versions, val history, best, test;
- ``test/cases.csv``, ``test/summary.json``, ``plots/*.png``, ``overlays/*.png``.

Defaults follow the published scripts: SGD (lr 0.01, momentum 0.9, weight
decay 1e-4), poly decay lr = base_lr * (1 - it / max_iterations) ** 0.9,
30k iterations, batch 16 with 8 labeled (2D) / batch 4 with 2 labeled (3D),
validation every 200 iterations. Differences from the scripts: validation
uses the validation split (the ACDC script selects on test patients), the
learning rate of iteration t is computed from t before the step.

Resuming (``resume``) restores the model (with prototype memories), optimiser,
grad scaler, RNG states of every rank, the sampler position and the
iteration: on CPU with ``deterministic`` a resumed run ends bitwise equal to
an uninterrupted one.

Data parallel: start with ``torchrun --nproc_per_node N -m icl train ...``;
each rank draws its own part of the global batch (``batch_size`` per rank),
gradients are averaged by DistributedDataParallel, and the prototype memories
all-reduce their statistics themselves.

``compile`` (``--compile default|reduce-overhead|max-autotune``): each
iteration's forward and losses (:func:`_forward_losses`, which calls the
DDP-wrapped step module, so Dynamo's DDPOptimizer splits the graphs at DDP's
gradient buckets) run through ``torch.compile`` with that mode; the backward
runs through the compiled graphs, the optimiser step stays eager. The network
itself is not wrapped, so checkpoints keep its own keys and compiled and eager
runs resume each other's checkpoints. The random views of the semi-supervised
methods break graphs (allowed: no ``fullgraph``). Compiled kernels draw their
random numbers differently from eager ones, so a compiled run does not repeat
an eager run bitwise.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import platform
import signal
import subprocess
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from . import checkpoint as ckpt_mod
from .data import (DATASETS, IntensityAugment, TrainAugment, TrainDataset, TwoStreamBatchSampler,
                   build_source, make_splits)
from .errors import ConfigError  # noqa: F401  (re-exported: icl.train.ConfigError)
from .evaluate import evaluate_cases, json_ready, write_results
from .inference import autocast
from .methods.base import supervised_loss  # noqa: F401  (re-exported: icl.train.supervised_loss)


#: ``--compile`` values: none (eager), or the ``mode`` given to ``torch.compile`` (default: its default mode).
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")

#: The ``torch.compile`` backend of ``--compile``. Not a user option: tests set ``"aot_eager"`` (the same
#: Dynamo graphs and AOTAutograd forward/backward split, run with eager kernels: seconds where inductor's
#: code generation takes minutes on a CPU). With a backend other than inductor the mode is not passed on.
_COMPILE_BACKEND = "inductor"


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint."""

    def __init__(self, iteration: int, path: str, signum: int):
        super().__init__(f"training interrupted at iteration {iteration}; checkpoint written to {path} "
                         f"(continue with --resume)")
        self.iteration = iteration
        self.path = path
        self.signum = signum


@dataclass
class TrainConfig:
    # data
    dataset: Optional[str] = None
    root: Optional[str] = None
    num_classes: Optional[int] = None
    labeled_num: Optional[int] = None
    labeled_fraction: Optional[float] = None
    patch_size: Optional[List[int]] = None
    in_channels: Optional[int] = None
    slice_axis: Optional[int] = None
    spacing: Optional[List[float]] = None
    normalization: Optional[Any] = None
    target_spacing: Optional[List[float]] = None
    ct_window: Optional[List[float]] = None
    cache_dir: Optional[str] = None
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    intensity_aug: Optional[Any] = None
    interpolation: str = "linear"
    fill: str = "edge"
    num_workers: int = 2
    # model / method
    model: str = "unet"
    model_options: Optional[Dict[str, Any]] = None
    method: str = "icl"
    icl_views: str = "one"
    icl_passes: str = "split"
    mixer: str = "conv"
    global_queries: str = "batch"
    faithful: bool = False
    max_mixer_params: Optional[int] = 50_000_000
    backend: str = "auto"
    # optimisation
    batch_size: Optional[int] = None
    labeled_bs: Optional[int] = None
    max_iterations: int = 30000
    base_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    loss_weights: Optional[Dict[str, float]] = None
    consistency_rampup: float = 0.0
    confidence_threshold: float = 0.95  # fixmatch, unimatch and icl's *-confident views: pseudo-labels at or above it
    amp: str = "none"
    compile: str = "none"  # torch.compile of each iteration's forward and losses: none, default, reduce-overhead, max-autotune
    seed: int = 1337
    deterministic: bool = False
    device: Optional[str] = None
    # evaluation / output
    val_every: int = 200
    save_every: int = 1000
    out: Optional[str] = None
    resume: Optional[str] = None
    overwrite: bool = False
    overlap: float = 0.5
    eval_batch_size: int = 8
    num_overlays: int = 3
    test: bool = True
    progress: bool = True

    @classmethod
    def fields(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: Dict, origin: str = "config") -> "TrainConfig":
        names = set(cls.fields())
        norm = {str(k).replace("-", "_"): v for k, v in (d or {}).items()}
        unknown = sorted(k for k in norm if k not in names)
        if unknown:
            raise ConfigError(f"{origin}: unknown option(s) {unknown}")
        from .validate import check_types

        return cls(**check_types(cls, norm, origin))

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    @property
    def spatial_dims(self) -> int:
        return len(self.patch_size)

    def resolve(self) -> "TrainConfig":
        """Fill defaults that depend on other options and validate; returns self."""
        req = [("dataset", "--dataset"), ("root", "--root"), ("num_classes", "--num-classes"),
               ("patch_size", "--patch-size"), ("out", "--out")]
        for attr, flag in req:
            if getattr(self, attr) in (None, "", []):
                raise ConfigError(f"{flag} is required")
        if self.dataset not in DATASETS:
            raise ConfigError(f"--dataset {self.dataset!r}: unknown data set; expected one of {', '.join(DATASETS)}")
        if not os.path.isdir(self.root):
            raise ConfigError(f"--root {self.root}: directory not found")
        if (self.labeled_num is None) == (self.labeled_fraction is None):
            raise ConfigError("give exactly one of --labeled-num and --labeled-fraction")
        self.patch_size = [int(p) for p in self.patch_size]
        if len(self.patch_size) not in (2, 3):
            raise ConfigError(f"--patch-size {self.patch_size}: give 2 (2D UNet) or 3 (3D UNet) sizes")
        if any(p <= 0 or p % 16 for p in self.patch_size):
            raise ConfigError(
                f"--patch-size {' '.join(map(str, self.patch_size))}: every size must be a positive multiple of 16 "
                f"(the UNet downsamples 16x)"
            )
        if len(self.patch_size) == 3 and all(p == 16 for p in self.patch_size):
            raise ConfigError(
                "--patch-size 16 16 16: the 3D UNet's bottleneck would be a single voxel, which its "
                "InstanceNorm cannot normalise in training; make at least one size 32 or more"
            )
        if int(self.num_classes) < 2:
            raise ConfigError(f"--num-classes must be at least 2 (background + one class), got {self.num_classes}")
        self.num_classes = int(self.num_classes)
        if self.batch_size is None:
            self.batch_size = 16 if self.spatial_dims == 2 else 4
        if self.labeled_bs is None:
            self.labeled_bs = self.batch_size // 2
        if self.labeled_bs <= 0 or self.labeled_bs > self.batch_size:
            raise ConfigError(f"--labeled-bs {self.labeled_bs} must be in 1..--batch-size ({self.batch_size})")
        if self.model not in ("unet", "swinunetr"):
            raise ConfigError(f"--model {self.model!r}: expected unet or swinunetr")
        if self.model == "unet" and self.model_options:
            raise ConfigError(f"model_options {self.model_options}: the unet backbone takes none")
        if self.model == "swinunetr" and any(p % 32 for p in self.patch_size):
            raise ConfigError(f"--patch-size {' '.join(map(str, self.patch_size))}: swinunetr needs every size a "
                              f"multiple of 32 (it downsamples 32x)")
        if self.interpolation not in ("linear", "nearest"):
            raise ConfigError(f"--interpolation {self.interpolation!r}: expected linear or nearest")
        if self.fill not in ("edge", "zero"):
            raise ConfigError(f"--fill {self.fill!r}: expected edge or zero")
        from .methods import get_method

        try:
            get_method(self.method).check_config(self)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if self.amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"--amp {self.amp!r}: expected none, bf16 or fp16")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"--compile {self.compile!r}: expected one of {', '.join(COMPILE_MODES)}")
        if self.backend not in ("auto", "triton", "cuda", "cpu", "torch"):
            raise ConfigError(f"--backend {self.backend!r}: expected auto, triton, cuda, cpu or torch")
        if self.max_iterations <= 0:
            raise ConfigError(f"--max-iterations must be positive, got {self.max_iterations}")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"--overlap must be in [0, 1), got {self.overlap}")
        try:
            IntensityAugment.from_config(self.intensity_aug)
        except ValueError as exc:
            raise ConfigError(f"--intensity-aug: {exc}") from exc
        from .validate import check_options

        check_options(self)
        return self

    @property
    def arch(self) -> str:
        if self.model == "unet":
            return "unet2d" if self.spatial_dims == 2 else "unet3d"
        return self.model

    def model_config(self) -> Dict:
        return {"arch": self.arch, "backbone_options": self.model_options, "in_channels": self.in_channels,
                "num_classes": self.num_classes, "patch_size": list(self.patch_size), "mixer": self.mixer,
                "global_queries": self.global_queries, "faithful": bool(self.faithful), "method": self.method}


# ---------------------------------------------------------------------- helpers


def versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    def _ver(pkg):
        try:
            return metadata.version(pkg)
        except Exception:
            return None

    commit = None
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        if commit:
            dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            if dirty:
                commit += "-dirty"
    except Exception:
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": _ver("triton"),
            "icl": _ver("icl-kernels") or "0.1.0", "numpy": np.__version__, "git_commit": commit}


class _Dist:
    """Rank/world of this process; initialises torch.distributed under torchrun."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.owns = False
        ws = int(os.environ.get("WORLD_SIZE", "1"))
        if ws > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend)
            self.owns = True
        self.enabled = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.enabled else 0
        self.world_size = dist.get_world_size() if self.enabled else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            self.dist.barrier()

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        if self.dist.get_backend() == "nccl":
            t = t.cuda()
        self.dist.all_reduce(t)
        return bool(t.item() > 0)

    def gather_objects(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out

    def close(self):
        if self.owns and self.dist.is_initialized():
            self.dist.destroy_process_group()


class _TrainStep(torch.nn.Module):
    """Routes DDP's forward to the method's forward (everything that needs gradients)."""

    def __init__(self, net, method):
        super().__init__()
        self.net = net
        self.method = method

    def forward(self, x_lab, x_unlab=None, y_lab=None, iteration: int = 0):
        return self.method.forward(self.net, x_lab, x_unlab, y_lab, iteration)


def _forward_losses(step_module, method, x_lab, x_unlab, y_lab, iteration: int) -> Dict[str, torch.Tensor]:
    """One iteration's forward (through the DDP-wrapped step module) and the method's losses: what
    ``--compile`` compiles. The backward runs through the compiled graphs' autograd; the optimiser
    step, the EMA teacher update (``after_step``) and logging stay eager."""
    out = step_module(x_lab, x_unlab, y_lab, iteration)
    return method.losses(out, y_lab, iteration)


def compile_forward_losses(mode: str, backend: Optional[str] = None) -> Callable:
    """``_forward_losses`` through ``torch.compile`` for ``--compile MODE`` (not fullgraph: the methods'
    random views and confidence masks break graphs, which ``default`` allows). Each call makes its own
    entry in Dynamo's cache (``isolate_recompiles``), so several trainers in one process do not use up
    each other's recompile limit."""
    backend = backend or _COMPILE_BACKEND
    kwargs: Dict[str, Any] = {"backend": backend}
    if backend == "inductor":
        kwargs["mode"] = None if mode == "default" else mode
    import inspect

    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:  # torch >= 2.14
        kwargs["isolate_recompiles"] = True
    return torch.compile(_forward_losses, **kwargs)


def _dynamic_int(value: int) -> int:
    """``value`` as an int that torch.compile traces as a symbol from the first call (torch >= 2.9's
    ``DynamicInt``; plain ints are constants at first and change the graph once, at iteration 1, before
    Dynamo makes them symbolic: a second compilation). An int to everything else."""
    try:
        from torch.fx.experimental.sym_node import DynamicInt
    except ImportError:
        return value
    return DynamicInt(value)


def _dynamo_counts() -> Dict[str, int]:
    """Dynamo's process-wide counts of compiled frames, graphs and graph breaks (a run reports its increase)."""
    from torch._dynamo.utils import counters

    return {"frames": int(counters["frames"]["ok"]), "graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def poly_lr(base_lr: float, it: int, max_it: int, power: float) -> float:
    return base_lr * (1.0 - it / max_it) ** power


class _SignalGuard:
    """Turns SIGINT/SIGTERM into a flag checked after each iteration (main thread only)."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def _worker_init(worker_id: int, main_pid: Optional[int] = None) -> None:
    """Loader workers leave Ctrl-C and outside SIGTERMs to the main process, which checkpoints before stopping.

    ``timeout``, SLURM and systemd signal the whole process group (or cgroup): a worker
    that died of it would take the run down before the main process could save. So a
    worker blocks SIGTERM and a thread reads each one with its sender: from the main
    process (which ends its workers this way) the worker exits at once, as PyTorch's
    own handler does; from anyone else it is ignored, and the main process ends the
    worker when it stops (a worker whose main process died exits by itself).
    """
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()  # the main process under fork; a forkserver under other start methods
    owners = {parent, main_pid or parent}
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask

    def wait_for_term():
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid in owners or os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=wait_for_term, name="icl-sigterm", daemon=True).start()


def seed_everything(seed: int, rank: int = 0) -> None:
    import random

    s = int(seed) + rank
    random.seed(s)
    np.random.seed(s % (2 ** 32))
    torch.manual_seed(s)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(s)


# ---------------------------------------------------------------------- trainer


@dataclass
class TrainResult:
    out: str
    metrics: Dict
    model: torch.nn.Module
    iteration: int


def _log_fields():
    return ["iteration", "lr", "total", "supervised", "auxiliary", "pseudo", "consistency", "confident",
            "consistency_scale", "mask_ratio", "seconds", "it_per_s"]


def train(config, hooks: Sequence[Callable] = ()) -> TrainResult:
    """Run training as ``config`` (a TrainConfig or dict) says; see the module docstring.

    hooks: callables ``hook(iteration, losses)`` run after every iteration (tests use them).
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    cfg.resolve()
    dist = _Dist()
    trainer = None
    try:
        trainer = _Trainer(cfg, dist, hooks)
        return trainer.run()
    except Exception as exc:
        if getattr(trainer, "out_ready", False) and dist.main and not isinstance(exc, TrainingInterrupted):
            from .rundir import log_failure

            exc.icl_log = log_failure(cfg.out, exc)  # the CLI points there instead of printing a traceback
        raise
    finally:
        dist.close()


class _Trainer:
    def __init__(self, cfg: TrainConfig, dist: _Dist, hooks):
        self.cfg = cfg
        self.dist = dist
        self.hooks = list(hooks)
        self.out = cfg.out
        self.ckpt_dir = os.path.join(self.out, "checkpoints")
        if cfg.device:
            self.device = torch.device(cfg.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", dist.local_rank if dist.enabled else torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        if cfg.amp == "fp16" and self.device.type != "cuda":
            warnings.warn("--amp fp16 on CPU runs without a GradScaler; bf16 is the safer choice on CPU")

    # -- setup ---------------------------------------------------------------
    def _setup_data(self):
        cfg = self.cfg
        opts = dict(slice_axis=cfg.slice_axis, spacing=cfg.spacing, normalization=cfg.normalization,
                    target_spacing=cfg.target_spacing, ct_window=cfg.ct_window,
                    cache_dir=cfg.cache_dir or os.path.join(self.out, "cache"))
        self.source = build_source(cfg.dataset, cfg.root, cfg.num_classes, **opts)
        if hasattr(self.source, "prepare"):
            if self.dist.main:
                self.source.prepare(progress=cfg.progress)
            self.dist.barrier()
        self.splits = make_splits(self.source, cfg.spatial_dims, cfg.labeled_num, cfg.labeled_fraction,
                                  seed=cfg.seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
        from .validate import check_against_data

        check_against_data(cfg, self.source, self.splits)
        if hasattr(self.source, "prepare"):  # evaluation cases too (NIfTI: no re-reading per validation)
            if self.dist.main:
                self.source.prepare(list(self.splits.val) + list(self.splits.test), progress=cfg.progress,
                                    for_eval=True)
            self.dist.barrier()
        # channels
        img, _ = self.source.load_item(self.splits.items[0])
        data_ch = int(img.shape[0])
        if cfg.in_channels is None:
            cfg.in_channels = data_ch
        elif int(cfg.in_channels) != data_ch:
            raise ConfigError(f"--in-channels {cfg.in_channels}, but {self.splits.items[0].path} has {data_ch} channel(s)")
        aug = TrainAugment(tuple(cfg.patch_size), IntensityAugment.from_config(cfg.intensity_aug),
                           interpolation=cfg.interpolation, fill=cfg.fill)
        self.train_set = TrainDataset(self.source, self.splits.items, aug, seed=cfg.seed)

    def _setup_model(self):
        cfg = self.cfg
        from .methods import get_method
        from .models import set_patch_size

        backend = None if cfg.backend == "auto" else cfg.backend  # auto also weighs the dtype (bf16 on CPU -> torch)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.method = get_method(cfg.method)(cfg)
        self.method.set_weights(cfg.loss_weights)
        try:
            self.net = self.method.build_net(backend)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.backbone = self.method.backbone(self.net)
        set_patch_size(self.backbone, cfg.patch_size)
        self.net.to(self.device)
        self.method.to(self.device)
        step = _TrainStep(self.net, self.method)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_module = DDP(step, device_ids=ids)
        else:
            self.step_module = step
        # --compile: the function, not the module, is compiled, so self.net (what checkpoints hold) keeps
        # its own state_dict keys (no "_orig_mod." prefix) and compiled and eager runs resume each other
        self.forward_losses = _forward_losses
        if cfg.compile != "none":
            self._compile_base, self._compile_backend = _dynamo_counts(), _COMPILE_BACKEND
            self.forward_losses = compile_forward_losses(cfg.compile, self._compile_backend)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=cfg.base_lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.scaler = None
        if cfg.amp == "fp16" and self.device.type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")

    # -- checkpoints -----------------------------------------------------------
    def _data_config(self) -> Dict:
        return {"dataset": self.cfg.dataset, "preprocessing": self.source.preprocessing(),
                "spacing": list(self.cfg.spacing) if self.cfg.spacing else None,
                "interpolation": self.cfg.interpolation}

    def _checkpoint(self, kind: str) -> Dict:
        c = {"format": ckpt_mod.FORMAT, "version": ckpt_mod.VERSION, "kind": kind,
             "model_config": self.cfg.model_config(), "data_config": self._data_config(),
             "config": json_ready(self.cfg.to_dict()), "model": self.net.state_dict(),
             "iteration": self.iteration, "best": self.best, "val": self.val_history}
        return c

    def sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm statistics) to every rank, as DDP does before each forward."""
        if self.dist.enabled:
            for b in self.net.buffers():
                self.dist.dist.broadcast(b.data, 0)

    def save_last(self) -> str:
        """Collective under DDP (gathers RNG states); rank 0 writes."""
        self.sync_buffers()
        rngs = self.dist.gather_objects(ckpt_mod.rng_state())
        path = os.path.join(self.ckpt_dir, "last.pt")
        if self.dist.main:
            c = self._checkpoint("train")
            c.update({"optimizer": self.optimizer.state_dict(),
                      "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                      "rng": rngs, "world_size": self.dist.world_size,
                      "method_state": self.method.state_dict(),
                      "sampler": {"step": self.iteration, "seed": self.cfg.seed}})
            ckpt_mod.save_atomic(c, path)
        self.dist.barrier()
        return path

    def _resume_path(self) -> Optional[str]:
        r = self.cfg.resume
        if r in (None, False, "", "none"):
            return None
        if r in (True, "auto", "last"):
            p = os.path.join(self.ckpt_dir, "last.pt")
            if not os.path.isfile(p):
                raise ConfigError(f"--resume: no checkpoint at {p}")
            return p
        return str(r)

    def _resume(self, c: Dict):
        path = c["path"]
        if c.get("kind") != "train":
            raise ckpt_mod.CheckpointError(f"{path}: holds weights only (kind {c.get('kind')!r}); --resume needs "
                                           f"a training checkpoint such as checkpoints/last.pt")
        ckpt_mod.check_compatible(c, self.cfg.model_config())
        old = c.get("config", {})
        for k in ("max_iterations", "batch_size", "labeled_bs", "seed", "labeled_num", "labeled_fraction", "dataset"):
            if k in old and old[k] != getattr(self.cfg, k):
                warnings.warn(f"--resume: {k} was {old[k]!r} in {path}, now {getattr(self.cfg, k)!r}")
        ckpt_mod.load_state(self.net, c["model"], what=path)
        try:
            self.method.load_state_dict(c.get("method_state") or {})
        except (ValueError, RuntimeError) as exc:
            raise ckpt_mod.CheckpointError(f"{path}: {exc}") from exc
        self.optimizer.load_state_dict(c["optimizer"])
        if self.scaler is not None and c.get("scaler"):
            self.scaler.load_state_dict(c["scaler"])
        self.iteration = int(c["iteration"])
        self.best = c.get("best")
        self.val_history = list(c.get("val") or [])
        rngs = c.get("rng") or []
        if len(rngs) == self.dist.world_size:
            ckpt_mod.set_rng_state(rngs[self.dist.rank])
        else:
            warnings.warn(f"--resume: {path} was written by {len(rngs)} rank(s), this run has "
                          f"{self.dist.world_size}; RNG states are reseeded")
            seed_everything(self.cfg.seed + self.iteration, self.dist.rank)

    # -- logging -------------------------------------------------------------
    def _open_logs(self):
        self.log_path = os.path.join(self.out, "log.csv")
        self.tb = None
        if not self.dist.main:
            return
        rows = []
        if self.iteration > 0 and os.path.isfile(self.log_path):
            with open(self.log_path) as f:
                rows = [r for r in csv.DictReader(f) if int(float(r["iteration"])) <= self.iteration]
        with open(self.log_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=_log_fields())
            w.writeheader()
            w.writerows(rows)
        self._log_file = open(self.log_path, "a", newline="")
        self._log_writer = csv.DictWriter(self._log_file, fieldnames=_log_fields())
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(self.out, "tensorboard"), purge_step=self.iteration or None)
        except Exception as exc:  # tensorboard missing or broken: keep training
            warnings.warn(f"TensorBoard logging disabled ({exc})")

    def _log(self, row: Dict):
        if not self.dist.main:
            return
        self._log_writer.writerow({k: row.get(k, "") for k in _log_fields()})
        self._log_file.flush()
        if self.tb is not None:
            it = row["iteration"]
            self.tb.add_scalar("lr", row["lr"], it)
            for k in ("total", "supervised", "auxiliary", "pseudo", "consistency"):
                if row.get(k) not in (None, ""):
                    self.tb.add_scalar(f"loss/{k}", row[k], it)

    def _write_metrics(self, test=None):
        if not self.dist.main:
            return
        m = {"config": json_ready(self.cfg.to_dict()), "versions": self.versions,
             "splits": {"labeled_cases": len(self.splits.labeled_cases), "labeled_items": self.splits.num_labeled,
                        "train_items": len(self.splits.items), "val_cases": len(self.splits.val),
                        "test_cases": len(self.splits.test), "val_origin": self.splits.val_origin},
             "val": self.val_history, "best": self.best, "iteration": self.iteration}
        if getattr(self, "_compile_base", None) is not None:
            # what torch.compile made of the step in this run (TORCH_LOGS=graph_breaks says where graphs break)
            now, base = _dynamo_counts(), self._compile_base
            m["compile"] = {"mode": self.cfg.compile, "backend": self._compile_backend,
                            **{k: now[k] - base[k] for k in now}}
        if test is not None:
            m["test"] = test
        elif getattr(self, "_test", None) is not None:
            m["test"] = self._test
        p = os.path.join(self.out, "metrics.json")
        with open(p + ".tmp", "w") as f:
            json.dump(json_ready(m), f, indent=2)
        os.replace(p + ".tmp", p)
        self.metrics = json_ready(m)

    # -- evaluation ----------------------------------------------------------
    def _evaluate(self, names, desc, keep=0):
        return evaluate_cases(self.backbone, self.source, names, self.cfg.num_classes, self.cfg.patch_size,
                              overlap=self.cfg.overlap, batch_size=self.cfg.eval_batch_size, device=self.device,
                              amp=self.cfg.amp, progress=self.cfg.progress, desc=desc, keep_predictions=keep,
                              interpolation=self.cfg.interpolation)

    def _validate(self):
        if not self.splits.val:
            return
        if self.dist.main:
            res = self._evaluate(self.splits.val, f"val @{self.iteration}")
            s = res["summary"]
            mean_dice = float(s["mean"]["dice"])
            rec = {"iteration": self.iteration, "mean_dice": mean_dice,
                   "mean_hd95": float(s["mean"]["hd95"]),
                   "per_class": {str(c): float(v["dice"]) for c, v in s["per_class"].items()}}
            self.val_history.append(rec)
            if self.tb is not None:
                self.tb.add_scalar("val/mean_dice", mean_dice, self.iteration)
                self.tb.add_scalar("val/mean_hd95", rec["mean_hd95"], self.iteration)
                for c, d in rec["per_class"].items():
                    self.tb.add_scalar(f"val/dice_class{c}", d, self.iteration)
            improved = self.best is None or (math.isfinite(mean_dice) and mean_dice > self.best["mean_dice"])
            if improved:
                self.best = {"iteration": self.iteration, "mean_dice": mean_dice}
                c = self._checkpoint("weights")
                ckpt_mod.save_atomic(c, os.path.join(self.ckpt_dir, "best.pt"))
            self._write_metrics()
            if self._bar is not None:
                self._bar.write(f"iteration {self.iteration}: val mean Dice {mean_dice:.4f}"
                                f"{' (best)' if improved else ''}")
        self.net.train()
        self.dist.barrier()

    def _final_test(self):
        cfg = self.cfg
        which = "last"
        best_path = os.path.join(self.ckpt_dir, "best.pt")
        if self.best is not None and os.path.isfile(best_path):
            c = ckpt_mod.load(best_path)
            ckpt_mod.load_state(self.backbone, ckpt_mod.backbone_state(c), what=best_path)
            which = "best"
        res = self._evaluate(self.splits.test, "test", keep=cfg.num_overlays)
        write_results(os.path.join(self.out, "test"), res)
        s = res["summary"]
        test = {"mean": {k: s["mean"].get(k) for k in ("dice", "jaccard", "hd95", "asd")},
                "per_class": {str(c): v for c, v in s["per_class"].items()},
                "num_cases": s.get("num_cases", len(res["cases"])), "checkpoint": which,
                "iteration": self.best["iteration"] if which == "best" else self.iteration}
        self._test = test
        self._write_metrics(test)
        try:
            from .utils import overlay, training_curves

            training_curves(self.log_path, self.val_history, os.path.join(self.out, "plots"))
            for case, pred in res["examples"]:
                overlay(case, pred, os.path.join(self.out, "overlays", f"{case.name}.png"),
                        slice_axis=self.source.slice_axis)
        except Exception as exc:  # plots are a convenience; never fail a finished run on them
            warnings.warn(f"plots not written ({type(exc).__name__}: {exc})")
        return test

    # -- main loop -----------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        from . import rundir

        rundir.check_run_dir(self.out, cfg.resume, cfg.overwrite)  # every rank, before rank 0 writes
        self.dist.barrier()
        self.versions = versions()
        self.iteration, self.best, self.val_history, self._test = 0, None, [], None
        self._bar = None
        resume = self._resume_path()
        ck = None
        if resume:  # check the checkpoint fits before reading any data
            ck = ckpt_mod.load(resume)
            ckpt_mod.check_compatible(ck, cfg.model_config())
        self._setup_data()
        self._setup_model()
        seed_everything(cfg.seed, self.dist.rank)
        if ck is not None:
            self._resume(ck)
        if self.dist.main:  # every check passed: now the old run may go
            rundir.prepare_run_dir(self.out, cfg.overwrite)
        self.out_ready = True
        if self.dist.main:
            import yaml

            with open(os.path.join(self.out, "config.yaml"), "w") as f:
                yaml.safe_dump(json_ready(cfg.to_dict()), f, sort_keys=False)
            self.splits.save(os.path.join(self.out, "splits.json"))
        self._open_logs()
        self._write_metrics()
        try:
            if self.iteration < cfg.max_iterations:
                self._loop()
            if self.dist.main and cfg.test and self.splits.test:
                self._final_test()
            else:
                self._write_metrics()  # the final iteration, also without a test or validation
            self.dist.barrier()
        finally:
            if self.dist.main:
                self._log_file.close()
                if self.tb is not None:
                    self.tb.close()
        return TrainResult(self.out, getattr(self, "metrics", {}), self.net, self.iteration)

    def _loop(self):
        cfg = self.cfg
        L = cfg.labeled_bs
        bs = cfg.batch_size if self.method.uses_unlabeled else L
        sampler = TwoStreamBatchSampler(self.splits.labeled_indices, self.splits.unlabeled_indices, bs, L,
                                        seed=cfg.seed, rank=self.dist.rank, world_size=self.dist.world_size,
                                        start_step=self.iteration, max_steps=cfg.max_iterations)
        gen = torch.Generator()
        gen.manual_seed(cfg.seed)
        loader = torch.utils.data.DataLoader(self.train_set, batch_sampler=sampler, num_workers=cfg.num_workers,
                                             pin_memory=self.device.type == "cuda", generator=gen,
                                             worker_init_fn=functools.partial(_worker_init, main_pid=os.getpid())
                                             if cfg.num_workers else None)
        from tqdm import tqdm

        self.net.train()
        bar = tqdm(total=cfg.max_iterations, initial=self.iteration, disable=not (cfg.progress and self.dist.main),
                   dynamic_ncols=True, desc=f"{cfg.method} {cfg.dataset}")
        self._bar = bar
        t_last = time.perf_counter()
        try:
            with _SignalGuard() as guard:
                for batch in loader:
                    losses = self._step(batch)
                    self.iteration += 1
                    now = time.perf_counter()
                    dt, t_last = now - t_last, now
                    row = {"iteration": self.iteration, "lr": self._lr, "seconds": round(dt, 5),
                           "it_per_s": round(1.0 / max(dt, 1e-9), 3)}
                    row.update(self.method.log_scalars())
                    row.update({k: float(v) for k, v in losses.items()})
                    self._log(row)
                    bar.update(1)
                    bar.set_postfix({k: f"{row[k]:.3f}" for k in ("total", "supervised", "auxiliary", "pseudo",
                                                                   "consistency") if k in row}, refresh=False)
                    for h in self.hooks:
                        h(self.iteration, row)
                    if cfg.val_every and self.iteration % cfg.val_every == 0:
                        self._validate()
                    stop = self.dist.any(guard.signum is not None)
                    if stop or (cfg.save_every and self.iteration % cfg.save_every == 0) \
                            or self.iteration == cfg.max_iterations:
                        path = self.save_last()
                    if stop:
                        self._write_metrics()
                        raise TrainingInterrupted(self.iteration, path, guard.signum or signal.SIGTERM)
                    if self.iteration >= cfg.max_iterations:
                        break
        finally:
            bar.close()
            self._bar = None
        self.sync_buffers()

    def _step(self, batch) -> Dict[str, torch.Tensor]:
        cfg = self.cfg
        L = cfg.labeled_bs
        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        lr = poly_lr(cfg.base_lr, self.iteration, cfg.max_iterations, cfg.poly_power)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self._lr = lr
        x_unlab = x[L:] if self.method.uses_unlabeled else None
        if cfg.compile in ("reduce-overhead", "max-autotune"):  # CUDA graph trees (GPU): a new step begins
            torch.compiler.cudagraph_mark_step_begin()
        it = self.iteration if cfg.compile == "none" else _dynamic_int(self.iteration)
        with autocast(self.device, cfg.amp):
            losses = self.forward_losses(self.step_module, self.method, x[:L], x_unlab, y[:L], it)
        total = losses["total"].float()
        if not torch.isfinite(total) and self.scaler is None:
            raise FloatingPointError(
                f"loss is {total.item()} at iteration {self.iteration}; lower --base-lr or use --amp none/bf16"
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            total.backward()
            self.optimizer.step()
        self.method.after_step(self.net, self.iteration + 1)
        return {k: v.detach().float() for k, v in losses.items()}
