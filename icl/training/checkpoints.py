"""A run's checkpoints: ``last.pt`` (every ``save_every``, at the end, on SIGINT/SIGTERM) with
everything a resume needs, and restoring a run from it."""
from __future__ import annotations

import os
import signal
import warnings
from typing import Dict, Optional

from .. import checkpoint as ckpt_mod
from ..errors import ConfigError
from ..evaluate import json_ready
from .events import Handler
from .logs import write_metrics
from .runtime import seed_everything

__all__ = ["LastCheckpoint", "TrainingInterrupted", "check_changes", "checkpoint_dict", "restore", "resume_path",
           "save_last"]


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint."""

    def __init__(self, iteration: int, path: str, signum: int):
        super().__init__(f"training interrupted at iteration {iteration}; checkpoint written to {path} "
                         f"(continue with --resume)")
        self.iteration = iteration
        self.path = path
        self.signum = signum


def checkpoint_dict(trainer, kind: str) -> Dict:
    """The weights and what describes them (model and data config, the run's config, progress)."""
    cfg = trainer.cfg
    data_config = {"dataset": cfg.dataset, "preprocessing": trainer.source.preprocessing(),
                   "spacing": list(cfg.spacing) if cfg.spacing else None, "interpolation": cfg.interpolation}
    return {"format": ckpt_mod.FORMAT, "version": ckpt_mod.VERSION, "kind": kind,
            "model_config": cfg.model_config(), "data_config": data_config,
            "config": json_ready(cfg.to_dict()), "model": trainer.net.state_dict(),
            "iteration": trainer.iteration, "best": trainer.best, "val": trainer.val_history}


def save_last(trainer) -> str:
    """``checkpoints/last.pt``; collective under DDP (gathers every rank's RNG states), rank 0 writes."""
    trainer.sync_buffers()
    dist = trainer.dist
    rngs = dist.gather_objects(ckpt_mod.rng_state())
    path = os.path.join(trainer.ckpt_dir, "last.pt")
    if dist.main:
        c = checkpoint_dict(trainer, "train")
        c.update({"optimizer": trainer.optimizer.state_dict(),
                  "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
                  "rng": rngs, "world_size": dist.world_size,
                  "method_state": trainer.method.state_dict(),
                  "sampler": {"step": trainer.iteration, "seed": trainer.cfg.seed}})
        ckpt_mod.save_atomic(c, path)
    dist.barrier()
    return path


class LastCheckpoint(Handler):
    """Writes ``last.pt`` every ``save_every`` iterations and at the last one; on SIGINT/SIGTERM (on any
    rank) writes it and stops the run with :class:`TrainingInterrupted`."""

    def iteration_completed(self, trainer, row: Dict) -> None:
        cfg = trainer.cfg
        signum = trainer.signals.signum if trainer.signals is not None else None
        stop = trainer.dist.any(signum is not None)
        if stop or (cfg.save_every and trainer.iteration % cfg.save_every == 0) \
                or trainer.iteration == cfg.max_iterations:
            path = save_last(trainer)
        if stop:
            write_metrics(trainer)
            raise TrainingInterrupted(trainer.iteration, path, signum or signal.SIGTERM)


def resume_path(cfg, ckpt_dir: str) -> Optional[str]:
    """The checkpoint ``--resume`` names (true/auto/last: the run's own last.pt), or None."""
    r = cfg.resume
    if r in (None, False, "", "none"):
        return None
    if r in (True, "auto", "last"):
        p = os.path.join(ckpt_dir, "last.pt")
        if not os.path.isfile(p):
            raise ConfigError(f"--resume: no checkpoint at {p}")
        return p
    return str(r)


#: Settings a resume may change freely: where and how the run executes and reports, not what
#: it trains. max_iterations may change too (to train longer), with a warning: the poly learning
#: rate follows it. Every other setting shapes the training trajectory.
OPERATIONAL = frozenset({"out", "resume", "overwrite", "allow_resume_changes", "progress", "val_every",
                         "save_every", "test", "overlap", "eval_batch_size", "num_overlays", "cache_dir",
                         "num_workers", "device", "root", "compile", "backend", "deterministic"})
WARNED = frozenset({"max_iterations"})


def check_changes(cfg, old: Dict, path: str) -> None:
    """Compare the run's settings with the checkpoint's: a changed training setting is refused
    (naming each, old and new) unless ``--allow-resume-changes``, which continues with a warning."""
    now = json_ready(cfg.to_dict())
    changed = [(k, old[k], now[k]) for k in now if k in old and old[k] != now[k] and k not in OPERATIONAL]
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed)
    hard = [k for k, _, _ in changed if k not in WARNED]
    if hard and not cfg.allow_resume_changes:
        raise ConfigError(f"--resume: {path} was trained with other settings ({listed}); resume with the "
                          f"checkpoint's, or pass --allow-resume-changes to continue with these")
    for k, a, b in changed:
        warnings.warn(f"--resume: {k} was {a!r} in {path}, now {b!r}")


def restore(trainer, c: Dict) -> None:
    """Model (with prototype memories), method state, optimiser, grad scaler, progress and this
    rank's RNG states from a training checkpoint."""
    path, cfg = c["path"], trainer.cfg
    if c.get("kind") != "train":
        raise ckpt_mod.CheckpointError(f"{path}: holds weights only (kind {c.get('kind')!r}); --resume needs "
                                       f"a training checkpoint such as checkpoints/last.pt")
    ckpt_mod.check_compatible(c, cfg.model_config())
    check_changes(cfg, c.get("config") or {}, path)
    ckpt_mod.load_state(trainer.net, c["model"], what=path)
    try:
        trainer.method.load_state_dict(c.get("method_state") or {})
    except (ValueError, RuntimeError) as exc:
        raise ckpt_mod.CheckpointError(f"{path}: {exc}") from exc
    trainer.optimizer.load_state_dict(c["optimizer"])
    if trainer.scaler is not None and c.get("scaler"):
        trainer.scaler.load_state_dict(c["scaler"])
    trainer.iteration = int(c["iteration"])
    trainer.best = c.get("best")
    trainer.val_history = list(c.get("val") or [])
    rngs = c.get("rng") or []
    dist = trainer.dist
    if len(rngs) == dist.world_size:
        ckpt_mod.set_rng_state(rngs[dist.rank])
    else:
        warnings.warn(f"--resume: {path} was written by {len(rngs)} rank(s), this run has "
                      f"{dist.world_size}; RNG states are reseeded")
        seed_everything(cfg.seed + trainer.iteration, dist.rank)
