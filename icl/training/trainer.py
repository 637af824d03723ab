"""The trainer: set up data and model, then one loop that fires events to handlers.

See :mod:`icl.train` for what a run writes and the defaults it follows.
"""
from __future__ import annotations

import functools
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch

from .. import checkpoint as ckpt_mod
from ..config import TrainConfig
from ..data import IntensityAugment, TrainAugment, TrainDataset, TwoStreamBatchSampler, build_source, make_splits
from ..errors import ConfigError
from ..evaluate import json_ready
from ..inference import autocast
from . import compile as compiled
from .checkpoints import LastCheckpoint, TrainingInterrupted, resume_path, restore
from .evaluation import Validation, final_test
from .events import CallbackHandler, Handler
from .logs import ProgressBar, RunLog, write_metrics
from .provenance import versions
from .runtime import Distributed, SignalGuard, seed_everything, set_deterministic, worker_init

__all__ = ["TrainResult", "Trainer", "default_handlers", "poly_lr", "train"]


@dataclass
class TrainResult:
    out: str
    metrics: Dict
    model: torch.nn.Module
    iteration: int


def poly_lr(base_lr: float, it: int, max_it: int, power: float) -> float:
    return base_lr * (1.0 - it / max_it) ** power


def train(config, hooks: Sequence[Callable] = (), handlers: Sequence[Handler] = ()) -> TrainResult:
    """Run training as ``config`` (a TrainConfig or dict) says; see :mod:`icl.train`.

    hooks: callables ``hook(iteration, row)`` run after every iteration.
    handlers: :class:`icl.training.events.Handler` objects, run after the built-in ones.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    cfg.resolve()
    dist = Distributed()
    trainer = None
    try:
        trainer = Trainer(cfg, dist, [CallbackHandler(h) for h in hooks] + list(handlers))
        return trainer.run()
    except Exception as exc:
        if getattr(trainer, "out_ready", False) and dist.main and not isinstance(exc, TrainingInterrupted):
            from ..rundir import log_failure

            exc.icl_log = log_failure(cfg.out, exc)  # the CLI points there instead of printing a traceback
        raise
    finally:
        if trainer is not None and trainer.lock is not None:
            trainer.lock.release()
        dist.close()


def default_handlers(trainer) -> List[Handler]:
    """The trainer's own parts, in the order they see each iteration."""
    return [trainer.log, trainer.progress, *trainer.user_handlers, Validation(), LastCheckpoint()]


class Trainer:
    def __init__(self, cfg: TrainConfig, dist: Distributed, handlers: Sequence[Handler] = ()):
        self.cfg = cfg
        self.dist = dist
        self.user_handlers = list(handlers)
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
        self.iteration, self.best, self.val_history = 0, None, []
        self.test_result = self.metrics = None
        self.log = self.progress = self.signals = self.lock = None
        self.compile_base = self.compile_backend = None

    # -- setup -----------------------------------------------------------------------------------
    def setup_data(self):
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
        from ..validate import check_against_data

        check_against_data(cfg, self.source, self.splits)
        if hasattr(self.source, "prepare"):  # evaluation cases too (NIfTI: no re-reading per validation)
            if self.dist.main:
                self.source.prepare(list(self.splits.val) + list(self.splits.test), progress=cfg.progress,
                                    for_eval=True)
            self.dist.barrier()
        img, _ = self.source.load_item(self.splits.items[0])
        data_ch = int(img.shape[0])
        if cfg.in_channels is None:
            cfg.in_channels = data_ch
        elif int(cfg.in_channels) != data_ch:
            raise ConfigError(f"--in-channels {cfg.in_channels}, but {self.splits.items[0].path} has {data_ch} channel(s)")
        aug = TrainAugment(tuple(cfg.patch_size), IntensityAugment.from_config(cfg.intensity_aug),
                           interpolation=cfg.interpolation, fill=cfg.fill)
        self.train_set = TrainDataset(self.source, self.splits.items, aug, seed=cfg.seed)

    def setup_model(self):
        cfg = self.cfg
        from ..methods import get_method
        from ..models import set_patch_size

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
        step = compiled.TrainStep(self.net, self.method)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_module = DDP(step, device_ids=ids)
        else:
            self.step_module = step
        self.forward_losses = compiled.forward_losses
        if cfg.compile != "none":
            self.compile_base, self.compile_backend = compiled.dynamo_counts(), compiled.COMPILE_BACKEND
            self.forward_losses = compiled.compile_forward_losses(cfg.compile, self.compile_backend)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=cfg.base_lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.scaler = None
        if cfg.amp == "fp16" and self.device.type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")

    # -- helpers the handlers use -------------------------------------------------------------
    def sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm statistics) to every rank, as DDP does before each forward."""
        if self.dist.enabled:
            for b in self.net.buffers():
                self.dist.dist.broadcast(b.data, 0)

    def say(self, msg: str) -> None:
        """A line above the progress bar (rank 0)."""
        if self.progress is not None:
            self.progress.write(msg)

    def fire(self, event: str, *args) -> None:
        for h in self.handlers:
            getattr(h, event)(self, *args)

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        if cfg.deterministic:
            set_deterministic()
        from .. import rundir

        if self.dist.main:  # held until the run ends: a second run into this folder is refused
            rundir.ensure_dir(self.out)
            self.lock = rundir.RunLock(self.out).acquire()
        rundir.check_run_dir(self.out, cfg.resume, cfg.overwrite)  # every rank, before rank 0 writes
        self.dist.barrier()
        self.versions = versions()
        resume = resume_path(cfg, self.ckpt_dir)
        ck = None
        if resume:  # check the checkpoint fits before reading any data
            ck = ckpt_mod.load(resume)
            ckpt_mod.check_compatible(ck, cfg.model_config())
        self.setup_data()
        self.setup_model()
        seed_everything(cfg.seed, self.dist.rank)
        if ck is not None:
            restore(self, ck)
        if self.dist.main:  # every check passed: now the old run may go
            rundir.prepare_run_dir(self.out, cfg.overwrite)
        self.out_ready = True
        if self.dist.main:
            import yaml

            with open(os.path.join(self.out, "config.yaml"), "w") as f:
                yaml.safe_dump(json_ready(cfg.to_dict()), f, sort_keys=False)
            self.splits.save(os.path.join(self.out, "splits.json"))
        self.log = RunLog(self.out, self.iteration, self.dist.main)
        self.progress = ProgressBar(cfg.progress and self.dist.main, f"{cfg.method} {cfg.dataset}")
        self.handlers = default_handlers(self)
        write_metrics(self)
        try:
            if self.iteration < cfg.max_iterations:
                self.loop()
            if self.dist.main and cfg.test and self.splits.test:
                final_test(self)
            else:
                write_metrics(self)  # the final iteration, also without a test or validation
            self.fire("completed")
            self.dist.barrier()
        finally:
            self.log.close()
        return TrainResult(self.out, self.metrics or {}, self.net, self.iteration)

    def loop(self):
        """Iterations until max_iterations; each one's row goes to every handler."""
        loader = self.loader()
        self.net.train()
        t_last = time.perf_counter()
        with SignalGuard() as self.signals:
            self.fire("started")
            try:
                for batch in loader:
                    losses = self._step(batch)
                    self.iteration += 1
                    now = time.perf_counter()
                    dt, t_last = now - t_last, now
                    row = {"iteration": self.iteration, "lr": self.lr, "seconds": round(dt, 5),
                           "it_per_s": round(1.0 / max(dt, 1e-9), 3), **self.method.log_scalars(),
                           **{k: float(v) for k, v in losses.items()}}
                    self.fire("iteration_completed", row)
                    if self.iteration >= self.cfg.max_iterations:
                        break
            finally:
                self.fire("ended")
        self.signals = None
        self.sync_buffers()

    def loader(self):
        cfg = self.cfg
        bs = cfg.batch_size if self.method.uses_unlabeled else cfg.labeled_bs
        sampler = TwoStreamBatchSampler(self.splits.labeled_indices, self.splits.unlabeled_indices, bs,
                                        cfg.labeled_bs, seed=cfg.seed, rank=self.dist.rank,
                                        world_size=self.dist.world_size, start_step=self.iteration,
                                        max_steps=cfg.max_iterations)
        gen = torch.Generator()
        gen.manual_seed(cfg.seed)
        init = functools.partial(worker_init, main_pid=os.getpid()) if cfg.num_workers else None
        return torch.utils.data.DataLoader(self.train_set, batch_sampler=sampler, num_workers=cfg.num_workers,
                                           pin_memory=self.device.type == "cuda", generator=gen,
                                           worker_init_fn=init)

    def _step(self, batch) -> Dict[str, torch.Tensor]:
        """One optimiser step: poly learning rate, forward and losses (compiled with --compile),
        backward (scaled under fp16), the method's after-step update (EMA teachers)."""
        cfg = self.cfg
        L = cfg.labeled_bs
        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        self.lr = poly_lr(cfg.base_lr, self.iteration, cfg.max_iterations, cfg.poly_power)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr
        x_unlab = x[L:] if self.method.uses_unlabeled else None
        if cfg.compile in ("reduce-overhead", "max-autotune"):  # CUDA graph trees (GPU): a new step begins
            torch.compiler.cudagraph_mark_step_begin()
        it = self.iteration if cfg.compile == "none" else compiled.dynamic_int(self.iteration)
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
