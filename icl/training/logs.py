"""What a run reports: ``log.csv`` and TensorBoard per iteration, the progress bar, ``metrics.json``."""
from __future__ import annotations

import csv
import json
import os
import warnings
from typing import Dict, Optional

from ..evaluate import json_ready
from .compile import dynamo_counts
from .events import Handler

__all__ = ["LOG_FIELDS", "ProgressBar", "RunLog", "write_metrics"]

#: the columns of log.csv
LOG_FIELDS = ("iteration", "lr", "total", "supervised", "auxiliary", "pseudo", "consistency", "confident",
              "consistency_scale", "mask_ratio", "seconds", "it_per_s")
_LOSS_TERMS = ("total", "supervised", "auxiliary", "pseudo", "consistency")


class RunLog(Handler):
    """``log.csv`` (one row per iteration; a resumed run keeps the rows up to its iteration) and
    TensorBoard scalars (``tb`` is also where validation writes); rank 0 only."""

    def __init__(self, out: str, iteration: int, main: bool):
        self.path = os.path.join(out, "log.csv")
        self.tb = None
        self._file = None
        if not main:
            return
        rows = []
        if iteration > 0 and os.path.isfile(self.path):
            with open(self.path) as f:
                rows = [r for r in csv.DictReader(f) if int(float(r["iteration"])) <= iteration]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            w.writeheader()
            w.writerows(rows)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=LOG_FIELDS)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=iteration or None)
        except Exception as exc:  # tensorboard missing or broken: keep training
            warnings.warn(f"TensorBoard logging disabled ({exc})")

    def iteration_completed(self, trainer, row: Dict) -> None:
        if self._file is None:
            return
        self._writer.writerow({k: row.get(k, "") for k in LOG_FIELDS})
        self._file.flush()
        if self.tb is not None:
            it = row["iteration"]
            self.tb.add_scalar("lr", row["lr"], it)
            for k in _LOSS_TERMS:
                if row.get(k) not in (None, ""):
                    self.tb.add_scalar(f"loss/{k}", row[k], it)

    def scalars(self, prefix: str, values: Dict[str, float], iteration: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, iteration)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tb is not None:
            self.tb.close()


class ProgressBar(Handler):
    """A tqdm bar over the iterations (rank 0, unless ``--no-progress``); ``write`` prints above it."""

    def __init__(self, enabled: bool, desc: str):
        self.enabled = enabled
        self.desc = desc
        self.bar = None

    def started(self, trainer) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=trainer.cfg.max_iterations, initial=trainer.iteration, disable=not self.enabled,
                        dynamic_ncols=True, desc=self.desc)

    def iteration_completed(self, trainer, row: Dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix({k: f"{row[k]:.3f}" for k in _LOSS_TERMS if k in row}, refresh=False)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)

    def ended(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def write_metrics(trainer, test: Optional[Dict] = None) -> None:
    """``metrics.json`` (atomically): config, versions, splits, validation history, best, test, and
    what torch.compile made of the step; rank 0 only. Also kept as ``trainer.metrics``."""
    if not trainer.dist.main:
        return
    cfg, splits = trainer.cfg, trainer.splits
    m = {"config": json_ready(cfg.to_dict()), "versions": trainer.versions,
         "splits": {"labeled_cases": len(splits.labeled_cases), "labeled_items": splits.num_labeled,
                    "train_items": len(splits.items), "val_cases": len(splits.val),
                    "test_cases": len(splits.test), "val_origin": splits.val_origin},
         "val": trainer.val_history, "best": trainer.best, "iteration": trainer.iteration}
    if trainer.compile_base is not None:
        # what torch.compile made of the step in this run (TORCH_LOGS=graph_breaks says where graphs break)
        now, base = dynamo_counts(), trainer.compile_base
        m["compile"] = {"mode": cfg.compile, "backend": trainer.compile_backend,
                        **{k: now[k] - base[k] for k in now}}
    if test is not None:
        trainer.test_result = test
    if trainer.test_result is not None:
        m["test"] = trainer.test_result
    p = os.path.join(trainer.out, "metrics.json")
    with open(p + ".tmp", "w") as f:
        json.dump(json_ready(m), f, indent=2)
    os.replace(p + ".tmp", p)
    trainer.metrics = json_ready(m)
