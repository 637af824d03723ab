"""The honest non-learning reference of the demo: two global intensity
thresholds (background|CSF < t_low < grey matter < t_high < white matter)
fitted on the training slices by grid search for the best mean Dice."""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np


def predict(image: np.ndarray, thresholds: Tuple[float, float]) -> np.ndarray:
    """Labels 0/1/2 of an image (any shape) from two thresholds; zero intensity is background."""
    lo, hi = thresholds
    out = np.zeros(image.shape, np.uint8)
    out[(image > lo) & (image <= hi)] = 1
    out[image > hi] = 2
    return out


def _mean_dice(pred: np.ndarray, label: np.ndarray) -> float:
    scores = []
    for k in (1, 2):
        p, g = pred == k, label == k
        denom = p.sum() + g.sum()
        scores.append(1.0 if denom == 0 else 2.0 * (p & g).sum() / denom)
    return float(np.mean(scores))


def fit(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], steps: int = 60) -> Tuple[float, float]:
    """Grid search of (t_low, t_high) over intensity quantiles of brain pixels."""
    img = np.concatenate([np.asarray(i).ravel() for i in images])
    lab = np.concatenate([np.asarray(l).ravel() for l in labels])
    grid = np.unique(np.quantile(img[img > 0], np.linspace(0.01, 0.99, steps)))
    best, best_t = -1.0, (float(grid[0]), float(grid[-1]))
    for i, lo in enumerate(grid):
        for hi in grid[i + 1:]:
            score = _mean_dice(predict(img, (lo, hi)), lab)
            if score > best:
                best, best_t = score, (float(lo), float(hi))
    return best_t
