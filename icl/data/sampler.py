"""Two-stream batch sampler: every batch holds ``labeled_bs`` labeled and
``batch_size - labeled_bs`` unlabeled items.

Each stream is an endless sequence of seeded permutations of its indices, so
the batch of step t is a pure function of (seed, t, rank): resuming needs only
the step, and under data parallelism rank r takes its own disjoint part of the
global batch (``world_size`` times the per-rank batch). Each element is a pair
``(index, key)``; ``key`` is a unique integer that seeds that sample's
augmentations.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Sampler


class _Stream:
    def __init__(self, indices: Sequence[int], seed: int, stream_id: int):
        self.indices = np.asarray(list(indices), dtype=np.int64)
        self.seed = seed
        self.stream_id = stream_id
        self._epoch = -1
        self._perm = None

    def take(self, start: int, count: int) -> List[int]:
        n = len(self.indices)
        out = []
        for p in range(start, start + count):
            epoch, off = divmod(p, n)
            if epoch != self._epoch:
                rng = np.random.default_rng([self.seed, self.stream_id, epoch])
                self._perm = self.indices[rng.permutation(n)]
                self._epoch = epoch
            out.append(int(self._perm[off]))
        return out


class TwoStreamBatchSampler(Sampler):
    def __init__(
        self,
        labeled_indices: Sequence[int],
        unlabeled_indices: Sequence[int],
        batch_size: int,
        labeled_bs: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        max_steps: Optional[int] = None,
    ):
        if labeled_bs <= 0:
            raise ValueError(f"--labeled-bs must be positive, got {labeled_bs}")
        if batch_size < labeled_bs:
            raise ValueError(f"--batch-size {batch_size} is smaller than --labeled-bs {labeled_bs}")
        if len(labeled_indices) == 0:
            raise ValueError("no labeled training items")
        if batch_size > labeled_bs and len(unlabeled_indices) == 0:
            raise ValueError(
                f"no unlabeled training items for the {batch_size - labeled_bs} unlabeled slots of each batch "
                f"(the labeled subset covers the whole training split)"
            )
        self.labeled_bs = labeled_bs
        self.unlabeled_bs = batch_size - labeled_bs
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.step = int(start_step)
        self.max_steps = max_steps
        self._lab = _Stream(labeled_indices, self.seed, 0)
        self._unl = _Stream(unlabeled_indices, self.seed, 1) if self.unlabeled_bs else None

    def batch(self, step: int) -> List[Tuple[int, int]]:
        """The (index, key) pairs of this rank's batch at ``step``.

        Keys number the positions of each stream (labeled even, unlabeled odd),
        so a labeled-only run with the same ``labeled_bs`` and seed (the
        supervised baseline) sees the same labeled samples with the same augmentations.
        """
        p0 = (step * self.world_size + self.rank) * self.labeled_bs
        lab = self._lab.take(p0, self.labeled_bs)
        out = [(idx, 2 * (p0 + j)) for j, idx in enumerate(lab)]
        if self._unl is not None:
            u0 = (step * self.world_size + self.rank) * self.unlabeled_bs
            unl = self._unl.take(u0, self.unlabeled_bs)
            out += [(idx, 2 * (u0 + j) + 1) for j, idx in enumerate(unl)]
        return out

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        step = self.step
        while self.max_steps is None or step < self.max_steps:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        if self.max_steps is None:
            raise TypeError("endless sampler: no length (set max_steps)")
        return max(0, self.max_steps - self.step)

    def state_dict(self) -> Dict:
        return {"step": self.step, "seed": self.seed, "world_size": self.world_size,
                "labeled_bs": self.labeled_bs, "batch_size": self.batch_size}

    def load_state_dict(self, state: Dict) -> None:
        self.step = int(state["step"])
