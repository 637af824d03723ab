"""Validation during training (with best-checkpoint selection) and the final test."""
from __future__ import annotations

import math
import os
import warnings
from typing import Dict

from .. import checkpoint as ckpt_mod
from ..evaluate import evaluate_cases, write_results
from .checkpoints import checkpoint_dict
from .events import Handler
from .logs import write_metrics

__all__ = ["Validation", "evaluate", "final_test"]


def evaluate(trainer, names, desc: str, keep: int = 0) -> Dict:
    cfg = trainer.cfg
    return evaluate_cases(trainer.backbone, trainer.source, names, cfg.num_classes, cfg.patch_size,
                          overlap=cfg.overlap, batch_size=cfg.eval_batch_size, device=trainer.device,
                          amp=cfg.amp, progress=cfg.progress, desc=desc, keep_predictions=keep,
                          interpolation=cfg.interpolation)


class Validation(Handler):
    """Every ``val_every`` iterations: the validation split's Dice and HD95 (rank 0), into the
    history, TensorBoard and metrics.json; a better mean Dice writes ``checkpoints/best.pt``."""

    def iteration_completed(self, trainer, row: Dict) -> None:
        every = trainer.cfg.val_every
        if every and trainer.iteration % every == 0:
            self.validate(trainer)

    def validate(self, trainer) -> None:
        if not trainer.splits.val:
            return
        if trainer.dist.main:
            it = trainer.iteration
            s = evaluate(trainer, trainer.splits.val, f"val @{it}")["summary"]
            mean_dice = float(s["mean"]["dice"])
            rec = {"iteration": it, "mean_dice": mean_dice, "mean_hd95": float(s["mean"]["hd95"]),
                   "per_class": {str(c): float(v["dice"]) for c, v in s["per_class"].items()}}
            trainer.val_history.append(rec)
            if trainer.log is not None:
                trainer.log.scalars("val", {"mean_dice": mean_dice, "mean_hd95": rec["mean_hd95"],
                                            **{f"dice_class{c}": d for c, d in rec["per_class"].items()}}, it)
            improved = trainer.best is None or (math.isfinite(mean_dice) and mean_dice > trainer.best["mean_dice"])
            if improved:
                trainer.best = {"iteration": it, "mean_dice": mean_dice}
                ckpt_mod.save_atomic(checkpoint_dict(trainer, "weights"), os.path.join(trainer.ckpt_dir, "best.pt"))
            write_metrics(trainer)
            trainer.say(f"iteration {it}: val mean Dice {mean_dice:.4f}{' (best)' if improved else ''}")
        trainer.net.train()
        trainer.dist.barrier()


def final_test(trainer) -> Dict:
    """The test split with the best checkpoint (the last weights without one): ``test/``,
    metrics.json's ``test``, then the training curves and overlays (rank 0)."""
    cfg = trainer.cfg
    which = "last"
    best_path = os.path.join(trainer.ckpt_dir, "best.pt")
    if trainer.best is not None and os.path.isfile(best_path):
        c = ckpt_mod.load(best_path)
        ckpt_mod.load_state(trainer.backbone, ckpt_mod.backbone_state(c), what=best_path)
        which = "best"
    res = evaluate(trainer, trainer.splits.test, "test", keep=cfg.num_overlays)
    write_results(os.path.join(trainer.out, "test"), res)
    s = res["summary"]
    test = {"mean": {k: s["mean"].get(k) for k in ("dice", "jaccard", "hd95", "asd")},
            "per_class": {str(c): v for c, v in s["per_class"].items()},
            "num_cases": s.get("num_cases", len(res["cases"])), "checkpoint": which,
            "iteration": trainer.best["iteration"] if which == "best" else trainer.iteration}
    write_metrics(trainer, test)
    try:
        from ..utils import overlay, training_curves

        training_curves(trainer.log.path, trainer.val_history, os.path.join(trainer.out, "plots"))
        for case, pred in res["examples"]:
            overlay(case, pred, os.path.join(trainer.out, "overlays", f"{case.name}.png"),
                    slice_axis=trainer.source.slice_axis)
    except Exception as exc:  # plots are a convenience; never fail a finished run on them
        warnings.warn(f"plots not written ({type(exc).__name__}: {exc})")
    return test
