"""Segmentation metrics on binary masks: Dice, Jaccard, HD95, ASD.

Values equal medpy's ``dc``, ``jc``, ``hd95``, ``asd`` whenever both masks are
non-empty: surfaces are the voxels removed by one binary erosion with the
face-connected structuring element (border_value 0), distances come from a
Euclidean distance transform with ``spacing`` (voxel units when None).
``asd(pred, gt)`` is medpy's directed mean distance from pred's surface to gt's.

Empty masks (where medpy returns 0 or raises):
- both empty: dice = jaccard = 1, hd95 = asd = 0;
- exactly one empty: dice = jaccard = 0, hd95 = asd = the image diagonal
  sqrt(sum((shape * spacing)^2)) (a worst-case distance, in the same units; the
  published ACDC evaluation uses a fixed 373.13 here), or NaN with
  ``on_empty="nan"``.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

__all__ = ["asd", "dice", "evaluate_case", "hd95", "jaccard", "summarize", "METRICS"]

METRICS = ("dice", "jaccard", "hd95", "asd")
Spacing = Optional[Union[float, Sequence[float]]]


def _mask(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(bool)


def _pair(pred, gt):
    p, g = _mask(pred), _mask(gt)
    if p.shape != g.shape:
        raise ValueError(f"metrics: pred {p.shape} and gt {g.shape} differ in shape")
    return p, g


def _spacing(spacing: Spacing, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    s = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if s.size == 1:
        s = np.repeat(s, ndim)
    if s.size != ndim:
        raise ValueError(f"metrics: spacing {tuple(s)} does not match a {ndim}-D mask")
    return s


def _empty_distance(shape, spacing: Spacing, on_empty: str) -> float:
    if on_empty == "nan":
        return float("nan")
    if on_empty != "diagonal":
        raise ValueError(f"metrics: on_empty must be 'diagonal' or 'nan', got {on_empty!r}")
    s = _spacing(spacing, len(shape))
    return float(math.sqrt(sum((n * d) ** 2 for n, d in zip(shape, s))))


def _surface(m: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(m.ndim, 1)
    return m ^ ndimage.binary_erosion(m, structure=structure, iterations=1)


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing: Spacing) -> np.ndarray:
    """Distances from each surface voxel of a to the nearest surface voxel of b (both non-empty)."""
    dist_to_b = ndimage.distance_transform_edt(~_surface(b), sampling=_spacing(spacing, b.ndim))
    return dist_to_b[_surface(a)]


def dice(pred, gt) -> float:
    """2|P & G| / (|P| + |G|) in [0, 1]; 1 when both are empty."""
    p, g = _pair(pred, gt)
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & g)) / total


def jaccard(pred, gt) -> float:
    """|P & G| / |P | G| in [0, 1]; 1 when both are empty."""
    p, g = _pair(pred, gt)
    union = int(np.count_nonzero(p | g))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(p & g)) / union


def hd95(pred, gt, spacing: Spacing = None, on_empty: str = "diagonal") -> float:
    """95th percentile of the symmetric surface distances (medpy ``hd95``).
    Both empty: 0; one empty: image diagonal (or NaN, ``on_empty="nan"``)."""
    p, g = _pair(pred, gt)
    hp, hg = p.any(), g.any()
    if not hp and not hg:
        return 0.0
    if not (hp and hg):
        return _empty_distance(p.shape, spacing, on_empty)
    d = np.concatenate([_surface_distances(p, g, spacing), _surface_distances(g, p, spacing)])
    return float(np.percentile(d, 95))


def asd(pred, gt, spacing: Spacing = None, on_empty: str = "diagonal") -> float:
    """Mean distance from pred's surface to gt's surface (medpy ``asd``, directed).
    Both empty: 0; one empty: image diagonal (or NaN, ``on_empty="nan"``)."""
    p, g = _pair(pred, gt)
    hp, hg = p.any(), g.any()
    if not hp and not hg:
        return 0.0
    if not (hp and hg):
        return _empty_distance(p.shape, spacing, on_empty)
    return float(_surface_distances(p, g, spacing).mean())


def evaluate_case(
    pred_labels, gt_labels, num_classes: int, spacing: Spacing = None, on_empty: str = "diagonal"
) -> Dict[int, Dict[str, float]]:
    """Per foreground class c in 1..num_classes-1: {"dice", "jaccard", "hd95", "asd"}
    of (pred == c) against (gt == c). pred_labels, gt_labels: integer label maps."""
    p = pred_labels.detach().cpu().numpy() if hasattr(pred_labels, "detach") else np.asarray(pred_labels)
    g = gt_labels.detach().cpu().numpy() if hasattr(gt_labels, "detach") else np.asarray(gt_labels)
    if p.shape != g.shape:
        raise ValueError(f"evaluate_case: pred {p.shape} and gt {g.shape} differ in shape")
    out: Dict[int, Dict[str, float]] = {}
    for c in range(1, num_classes):
        pc, gc = p == c, g == c
        out[c] = {
            "dice": dice(pc, gc),
            "jaccard": jaccard(pc, gc),
            "hd95": hd95(pc, gc, spacing, on_empty),
            "asd": asd(pc, gc, spacing, on_empty),
        }
    return out


def _nanmean(values: Iterable[float]) -> float:
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0 or np.all(np.isnan(v)):
        return float("nan")
    return float(np.nanmean(v))


def _nanstd(values: Iterable[float]) -> float:
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0 or np.all(np.isnan(v)):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanstd(v))


def summarize(cases: Sequence[Mapping[int, Mapping[str, float]]]) -> Dict[str, Dict]:
    """Aggregate ``evaluate_case`` results over cases.

    Returns ``{"mean": {metric: mean over classes of the per-class means},
    "std": {metric: std over cases of the per-case class mean},
    "per_class": {c: {metric: mean over cases}}, "num_cases": n}``. NaNs are skipped.
    """
    cases = list(cases)
    classes: List[int] = sorted({c for case in cases for c in case})
    per_class = {
        c: {m: _nanmean(case[c][m] for case in cases if c in case) for m in METRICS} for c in classes
    }
    mean = {m: _nanmean(per_class[c][m] for c in classes) for m in METRICS}
    std = {
        m: _nanstd(_nanmean(case[c][m] for c in case) for case in cases if case) for m in METRICS
    }
    return {"mean": mean, "std": std, "per_class": per_class, "num_cases": len(cases)}
