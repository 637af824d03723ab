"""The trainer in parts (the entry point is :func:`icl.train.train`).

- ``trainer``: data and model setup, the loop, one optimiser step;
- ``events``: :class:`Handler`, the events the loop fires (the extension point);
- ``logs``: log.csv, TensorBoard, the progress bar, metrics.json;
- ``checkpoints``: last.pt, stopping on signals, resuming;
- ``evaluation``: validation with best-checkpoint selection, the final test;
- ``compile``: ``--compile``; ``runtime``: ranks, signals, loader workers, seeds;
  ``provenance``: versions and the git commit.
"""
from .events import CallbackHandler, Handler

__all__ = ["CallbackHandler", "Handler"]
