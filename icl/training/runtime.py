"""The process around the loop: ranks (torchrun), signals, loader workers, seeds, determinism."""
from __future__ import annotations

import os
import signal
from typing import Optional

import numpy as np
import torch

__all__ = ["Distributed", "SignalGuard", "seed_everything", "set_deterministic", "worker_init"]


class Distributed:
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


class SignalGuard:
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


def worker_init(worker_id: int, main_pid: Optional[int] = None) -> None:
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


def set_deterministic() -> None:
    """Deterministic kernels (``--deterministic``): on CPU a resumed run then ends bitwise equal to
    an uninterrupted one."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
