"""Intensity normalisation and resampling for raw (NIfTI) data.

Schemes, chosen per channel:
- ``ct``: clip to a window (default -175..250 HU, the published AMOS window) and scale to [0, 1];
- ``zscore``: subtract the mean and divide by the std of the non-zero voxels
  (the whole image when it has no zeros), zeros stay background;
- ``percentile``: clip to the 0.5 / 99.5 percentiles of the non-zero voxels and scale to [0, 1];
- ``none``: leave as is.
The default per channel comes from the modality names in ``dataset.json``:
CT -> ``ct``, anything else -> ``zscore``.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
from scipy import ndimage

SCHEMES = ("ct", "zscore", "percentile", "none")
DEFAULT_CT_WINDOW = (-175.0, 250.0)


def scheme_for_modality(name: str) -> str:
    return "ct" if str(name).strip().lower() == "ct" else "zscore"


def normalize_channel(c: np.ndarray, scheme: str, ct_window: Sequence[float] = DEFAULT_CT_WINDOW) -> np.ndarray:
    c = c.astype(np.float32, copy=False)
    if scheme == "none":
        return c
    if scheme == "ct":
        lo, hi = float(ct_window[0]), float(ct_window[1])
        return ((np.clip(c, lo, hi) - lo) / max(hi - lo, 1e-8)).astype(np.float32)
    mask = c != 0
    vals = c[mask] if mask.any() and not mask.all() else c.reshape(-1)
    if scheme == "zscore":
        mean, std = float(vals.mean()), float(vals.std())
        out = (c - mean) / max(std, 1e-8)
        if mask.any() and not mask.all():
            out[~mask] = 0.0
        return out.astype(np.float32)
    if scheme == "percentile":
        lo, hi = np.percentile(vals, [0.5, 99.5])
        return ((np.clip(c, lo, hi) - lo) / max(float(hi - lo), 1e-8)).astype(np.float32)
    raise ValueError(f"normalization: unknown scheme {scheme!r}; expected one of {SCHEMES}")


def normalize(image: np.ndarray, schemes: Sequence[str], ct_window=DEFAULT_CT_WINDOW) -> np.ndarray:
    if len(schemes) != image.shape[0]:
        raise ValueError(f"normalization: {len(schemes)} scheme(s) for {image.shape[0]} channel(s)")
    return np.stack([normalize_channel(c, s, ct_window) for c, s in zip(image, schemes)]).astype(np.float32)


def target_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> Tuple[int, ...]:
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def resample_image(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """[C, *spatial] float -> [C, *shape], linear interpolation."""
    shape = tuple(shape)
    if tuple(image.shape[1:]) == shape:
        return image
    f = [t / s for t, s in zip(shape, image.shape[1:])]
    out = [ndimage.zoom(c, f, order=1, mode="nearest", grid_mode=True) for c in image]
    return np.stack([_fit(o, shape) for o in out]).astype(np.float32)


def resample_label(label: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    shape = tuple(shape)
    if tuple(label.shape) == shape:
        return label
    f = [t / s for t, s in zip(shape, label.shape)]
    out = ndimage.zoom(label, f, order=0, mode="nearest", grid_mode=True)
    return _fit(out, shape).astype(label.dtype)


def _fit(a: np.ndarray, shape) -> np.ndarray:
    if a.shape == tuple(shape):
        return a
    pads = [(0, max(0, t - s)) for s, t in zip(a.shape, shape)]
    return np.pad(a, pads, mode="edge")[tuple(slice(0, t) for t in shape)]
