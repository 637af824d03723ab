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
iteration's forward and losses (:func:`icl.training.compile.forward_losses`, which calls the
DDP-wrapped step module, so Dynamo's DDPOptimizer splits the graphs at DDP's
gradient buckets) run through ``torch.compile`` with that mode; the backward
runs through the compiled graphs, the optimiser step stays eager. The network
itself is not wrapped, so checkpoints keep its own keys and compiled and eager
runs resume each other's checkpoints. The random views of the semi-supervised
methods break graphs (allowed: no ``fullgraph``). Compiled kernels draw their
random numbers differently from eager ones, so a compiled run does not repeat
an eager run bitwise.

The parts live in :mod:`icl.training` (config in :mod:`icl.config`, checks in
:mod:`icl.validate`): ``trainer`` (setup and the loop), ``events`` (handlers:
the extension point), ``logs``, ``checkpoints``, ``evaluation``, ``compile``,
``runtime`` (ranks, signals, seeds) and ``provenance``. This module is the
stable entry point.
"""
from __future__ import annotations

from .config import TrainConfig
from .errors import ConfigError
from .methods.base import supervised_loss
from .training.checkpoints import TrainingInterrupted
from .training.compile import COMPILE_MODES, compile_forward_losses
from .training.events import Handler
from .training.provenance import versions
from .training.runtime import seed_everything
from .training.trainer import TrainResult, Trainer, poly_lr, train

_Trainer = Trainer  # the name tests patch (icl.train._Trainer._step)

__all__ = ["COMPILE_MODES", "ConfigError", "Handler", "TrainConfig", "TrainResult", "Trainer", "TrainingInterrupted",
           "compile_forward_losses", "poly_lr", "seed_everything", "supervised_loss", "train", "versions"]
