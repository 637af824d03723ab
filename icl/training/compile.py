"""``--compile``: each iteration's forward and losses through ``torch.compile``.

The function :func:`forward_losses` (which calls the DDP-wrapped step module, so
Dynamo's DDPOptimizer splits the graphs at DDP's gradient buckets) is compiled,
not the network, so checkpoints keep the network's own keys and compiled and
eager runs resume each other's checkpoints. The backward runs through the
compiled graphs; the optimiser step stays eager.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

__all__ = ["COMPILE_MODES", "TrainStep", "compile_forward_losses", "dynamic_int", "dynamo_counts", "forward_losses"]

#: ``--compile`` values: none (eager), or the ``mode`` given to ``torch.compile`` (default: its default mode).
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")

#: The ``torch.compile`` backend of ``--compile``. Not a user option: tests set ``"aot_eager"`` (the same
#: Dynamo graphs and AOTAutograd forward/backward split, run with eager kernels: seconds where inductor's
#: code generation takes minutes on a CPU). With a backend other than inductor the mode is not passed on.
COMPILE_BACKEND = "inductor"


class TrainStep(torch.nn.Module):
    """Routes DDP's forward to the method's forward (everything that needs gradients)."""

    def __init__(self, net, method):
        super().__init__()
        self.net = net
        self.method = method

    def forward(self, x_lab, x_unlab=None, y_lab=None, iteration: int = 0):
        return self.method.forward(self.net, x_lab, x_unlab, y_lab, iteration)


def forward_losses(step_module, method, x_lab, x_unlab, y_lab, iteration: int) -> Dict[str, torch.Tensor]:
    """One iteration's forward (through the DDP-wrapped step module) and the method's losses: what
    ``--compile`` compiles. The backward runs through the compiled graphs' autograd; the optimiser
    step, the EMA teacher update (``after_step``) and logging stay eager."""
    out = step_module(x_lab, x_unlab, y_lab, iteration)
    return method.losses(out, y_lab, iteration)


def compile_forward_losses(mode: str, backend: Optional[str] = None) -> Callable:
    """``forward_losses`` through ``torch.compile`` for ``--compile MODE`` (not fullgraph: the methods'
    random views and confidence masks break graphs, which ``default`` allows). Each call makes its own
    entry in Dynamo's cache (``isolate_recompiles``), so several trainers in one process do not use up
    each other's recompile limit."""
    backend = backend or COMPILE_BACKEND
    kwargs: Dict[str, Any] = {"backend": backend}
    if backend == "inductor":
        kwargs["mode"] = None if mode == "default" else mode
    import inspect

    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:  # torch >= 2.14
        kwargs["isolate_recompiles"] = True
    return torch.compile(forward_losses, **kwargs)


def dynamic_int(value: int) -> int:
    """``value`` as an int that torch.compile traces as a symbol from the first call (torch >= 2.9's
    ``DynamicInt``; plain ints are constants at first and change the graph once, at iteration 1, before
    Dynamo makes them symbolic: a second compilation). An int to everything else."""
    try:
        from torch.fx.experimental.sym_node import DynamicInt
    except ImportError:
        return value
    return DynamicInt(value)


def dynamo_counts() -> Dict[str, int]:
    """Dynamo's process-wide counts of compiled frames, graphs and graph breaks (a run reports its increase)."""
    from torch._dynamo.utils import counters

    return {"frames": int(counters["frames"]["ok"]), "graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}
