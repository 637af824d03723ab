"""Torch data sets over a :class:`~icl.data.sources.Source`."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .io import DataError
from .sources import Item, Source


class TrainDataset(Dataset):
    """Training items with augmentations seeded per sample.

    Indexed by ``(index, key)`` pairs from :class:`TwoStreamBatchSampler` (or a
    plain index, then key = index). Returns image float32 [C, *patch], label
    int64 [*patch] (zeros for items without a label), ``labeled`` and ``index``.
    """

    def __init__(self, source: Source, items: Sequence[Item], transform, seed: int = 0):
        self.source = source
        self.items = list(items)
        self.transform = transform
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        if isinstance(key, (tuple, list)):
            idx, skey = int(key[0]), int(key[1])
        else:
            idx, skey = int(key), int(key)
        item = self.items[idx]
        try:
            image, label = self.source.load_item(item)
        except DataError:
            raise
        except Exception as exc:  # name the file: in a loader worker the traceback would not reach the user
            where = item.path if item.index is None else f"{item.path} slice {item.index}"
            raise DataError(f"{where}: cannot read this training item ({type(exc).__name__}: {exc})") from exc
        labeled = label is not None
        if label is None:
            label = np.zeros(image.shape[1:], dtype=np.int64)
        rng = np.random.default_rng([self.seed, 7, skey])
        if self.transform is not None:
            image, label = self.transform(image, label, rng)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)),
            "labeled": labeled,
            "index": idx,
        }
