"""Handlers: what runs around the training loop, one event at a time.

The loop (:meth:`icl.training.trainer.Trainer.loop`) fires four events, in
order, to its handlers (in the order they were given):

- ``started(trainer)``: before the first iteration of this run (also after a resume);
- ``iteration_completed(trainer, row)``: after each optimiser step, with the
  iteration's log row (``iteration``, ``lr``, the losses, ``seconds``, ...);
- ``ended(trainer)``: when the loop stops (finished, interrupted or failed);
- ``completed(trainer)``: after the final test, when the run is complete.

The trainer's own parts are handlers too (the log, the progress bar,
validation with best-checkpoint selection, ``last.pt`` and the stop on
SIGINT/SIGTERM: :func:`icl.training.trainer.default_handlers`). Pass your own
with ``icl.train(config, handlers=[...])``: they run after the built-in ones.
"""
from __future__ import annotations

from typing import Callable, Dict

__all__ = ["CallbackHandler", "Handler"]


class Handler:
    """Base class: override the events you need (each default does nothing)."""

    def started(self, trainer) -> None:
        pass

    def iteration_completed(self, trainer, row: Dict) -> None:
        pass

    def ended(self, trainer) -> None:
        pass

    def completed(self, trainer) -> None:
        pass


class CallbackHandler(Handler):
    """A plain ``fn(iteration, row)`` run after every iteration (``train(config, hooks=[fn])``)."""

    def __init__(self, fn: Callable[[int, Dict], None]):
        self.fn = fn

    def iteration_completed(self, trainer, row: Dict) -> None:
        self.fn(trainer.iteration, row)
