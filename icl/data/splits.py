"""Labeled subsets and train/val/test splits."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .io import DataError
from .sources import Item, Source


@dataclass
class Splits:
    """Training items (labeled first), validation and test case names, and where each came from."""

    items: List[Item]
    num_labeled: int
    val: List[str]
    test: List[str]
    val_origin: str = "list"
    test_origin: str = "list"
    labeled_cases: List[str] = field(default_factory=list)

    @property
    def labeled_indices(self) -> List[int]:
        return list(range(self.num_labeled))

    @property
    def unlabeled_indices(self) -> List[int]:
        return list(range(self.num_labeled, len(self.items)))

    def record(self) -> Dict:
        train_cases: List[str] = []
        for it in self.items:
            if not train_cases or train_cases[-1] != it.case:
                train_cases.append(it.case)
        return {
            "num_train_items": len(self.items),
            "num_labeled_items": self.num_labeled,
            "labeled_cases": self.labeled_cases,
            "train_cases": list(dict.fromkeys(train_cases)),
            "val": self.val,
            "val_origin": self.val_origin,
            "test": self.test,
            "test_origin": self.test_origin,
        }

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.record(), f, indent=2)


def make_splits(
    source: Source,
    spatial_dims: int,
    labeled_num: Optional[int] = None,
    labeled_fraction: Optional[float] = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> Splits:
    """Training items and the labeled subset (a prefix of the training list).

    ``labeled_num`` counts patients for ACDC 2D (the published table) and cases
    otherwise; ``labeled_fraction`` takes the first fraction of the training
    items (slices for 2D data sets of slices, cases for volumes). Splits that
    the data set has no list for are drawn with ``seed`` from the training
    cases outside the labeled subset.
    """
    if (labeled_num is None) == (labeled_fraction is None):
        raise DataError("give exactly one of --labeled-num and --labeled-fraction")
    items = source.train_items(spatial_dims)
    if not items:
        raise DataError(f"{source.root}: the training split is empty")
    n_with_label = sum(1 for it in items if it.labeled)
    if labeled_num is not None:
        if labeled_num <= 0:
            raise DataError(f"--labeled-num must be positive, got {labeled_num}")
        n_lab = source.labeled_count([it for it in items if it.labeled], labeled_num, spatial_dims)
    else:
        if not 0.0 < labeled_fraction <= 1.0:
            raise DataError(f"--labeled-fraction must be in (0, 1], got {labeled_fraction}")
        n_lab = max(1, int(round(labeled_fraction * n_with_label)))
    n_lab = min(n_lab, n_with_label)
    labeled_cases = list(dict.fromkeys(it.case for it in items[:n_lab]))
    lab_set = set(labeled_cases)
    # candidates for drawn splits: cases with labels outside the labeled subset
    cand = list(dict.fromkeys(it.case for it in items[n_lab:] if it.labeled and it.case not in lab_set))
    rng = np.random.default_rng([int(seed), 11])
    all_cases = list(dict.fromkeys(it.case for it in items))

    def draw(frac, what):
        k = max(1, int(round(frac * len(all_cases))))
        if len(cand) <= k:
            raise DataError(
                f"{source.root}: no {what} list and too few labeled training cases outside the labeled subset "
                f"to draw one ({len(cand)} left, {k} needed)"
            )
        pick = sorted(rng.choice(len(cand), size=k, replace=False).tolist())
        chosen = [cand[i] for i in pick]
        for c in chosen:
            cand.remove(c)
        return chosen

    if source.has_split("val"):
        val, val_origin = source.cases("val"), "list"
    else:
        val, val_origin = draw(val_fraction, "val"), f"seeded (seed {seed})"
    if source.has_split("test"):
        test, test_origin = source.cases("test"), "list"
    else:
        test, test_origin = draw(test_fraction, "test"), f"seeded (seed {seed})"
    held = set(val) | set(test)
    overlap = held & lab_set
    if overlap:
        raise DataError(f"{source.root}: validation/test cases {sorted(overlap)[:3]} are also in the labeled subset")
    items = [it for it in items if it.case not in held]
    return Splits(items=items, num_labeled=n_lab, val=val, test=test, val_origin=val_origin,
                  test_origin=test_origin, labeled_cases=labeled_cases)
