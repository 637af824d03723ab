"""Augmentations for 2D slices and 3D volumes.

All randomness comes from a ``numpy.random.Generator`` passed in by the caller:
the training data set seeds one per sample from (seed, sample key), so the
augmentations of a batch depend only on the run's seed and the iteration,
not on the number of loader workers or on where a run was resumed.

Arrays: image float32 [C, *spatial], label int64 [*spatial] or None.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage


def resize(image: np.ndarray, label: Optional[np.ndarray], size: Sequence[int], order: int = 1):
    """Resize to ``size`` (image: bilinear/trilinear, or nearest with ``order=0`` as the
    published 2D pipeline; label: nearest)."""
    size = tuple(int(s) for s in size)
    spatial = image.shape[1:]
    if tuple(spatial) == size:
        return image, label
    factors = [t / s for t, s in zip(size, spatial)]
    out = np.stack([_zoom_to(c, factors, size, order=order) for c in image]).astype(np.float32)
    if label is not None:
        label = _zoom_to(label, factors, size, order=0).astype(np.int64)
    return out, label


def _zoom_to(a: np.ndarray, factors, size, order: int) -> np.ndarray:
    z = ndimage.zoom(a, factors, order=order, mode="nearest", grid_mode=False)
    if z.shape != tuple(size):  # zoom can be off by one through rounding
        pads = [(0, max(0, t - s)) for s, t in zip(z.shape, size)]
        z = np.pad(z, pads, mode="edge")[tuple(slice(0, t) for t in size)]
    return z


def rot_flip(image, label, rng: np.random.Generator, axes: Tuple[int, int] = (0, 1)):
    """A random multiple of 90 degrees in the plane ``axes`` and a random flip of one spatial axis."""
    k = int(rng.integers(0, 4))
    a0, a1 = axes
    image = np.rot90(image, k, axes=(a0 + 1, a1 + 1))
    if label is not None:
        label = np.rot90(label, k, axes=(a0, a1))
    nd = image.ndim - 1
    ax = int(rng.integers(0, nd))
    image = np.flip(image, axis=ax + 1)
    if label is not None:
        label = np.flip(label, axis=ax)
    return np.ascontiguousarray(image), (None if label is None else np.ascontiguousarray(label))


#: 2D image resampling modes (training and evaluation) and rotation-corner fills.
INTERPOLATIONS = ("linear", "nearest")
FILLS = ("edge", "zero")


def rotate(image, label, rng: np.random.Generator, max_angle: float = 20.0, axes=(0, 1), order: int = 1,
           fill: str = "edge", integer_angle: bool = False):
    """A random rotation in [-max_angle, max_angle) degrees in the plane ``axes`` (size kept).

    The angle is uniform in that interval, or with ``integer_angle`` a whole number of
    degrees from -max_angle to max_angle - 1 (the published pipeline draws
    ``randint(-20, 20)``). Image: bilinear (``order=1``) or nearest (``order=0``);
    corners outside the rotated image repeat the edge (``fill="edge"``) or are 0
    (``fill="zero"``, the published pipeline). Label: nearest, corners 0."""
    if fill not in FILLS:
        raise ValueError(f"rotate: fill must be 'edge' or 'zero', got {fill!r}")
    mode = "nearest" if fill == "edge" else "constant"
    if integer_angle:
        angle = float(rng.integers(-int(max_angle), int(max_angle)))
    else:
        angle = float(rng.uniform(-max_angle, max_angle))
    a0, a1 = axes
    image = np.stack(
        [ndimage.rotate(c, angle, axes=(a0, a1), order=order, reshape=False, mode=mode, cval=0.0) for c in image]
    ).astype(np.float32)
    if label is not None:
        label = ndimage.rotate(label, angle, axes=(a0, a1), order=0, reshape=False, mode="constant", cval=0)
    return image, label


def random_crop(image, label, size: Sequence[int], rng: np.random.Generator):
    """A random crop of ``size``; axes shorter than ``size`` are zero-padded (centred) first."""
    size = tuple(int(s) for s in size)
    spatial = image.shape[1:]
    pads = []
    for s, t in zip(spatial, size):
        p = max(0, t - s)
        pads.append((p // 2, p - p // 2))
    if any(p != (0, 0) for p in pads):
        image = np.pad(image, [(0, 0)] + pads, mode="constant")
        if label is not None:
            label = np.pad(label, pads, mode="constant")
    spatial = image.shape[1:]
    starts = [int(rng.integers(0, s - t + 1)) for s, t in zip(spatial, size)]
    sl = tuple(slice(a, a + t) for a, t in zip(starts, size))
    image = np.ascontiguousarray(image[(slice(None),) + sl])
    if label is not None:
        label = np.ascontiguousarray(label[sl])
    return image, label


def center_crop_or_pad(image, label, size):
    """Deterministic crop/pad to ``size`` (centred)."""
    size = tuple(int(s) for s in size)
    pads = [(max(0, t - s) // 2, max(0, t - s) - max(0, t - s) // 2) for s, t in zip(image.shape[1:], size)]
    image = np.pad(image, [(0, 0)] + pads)
    if label is not None:
        label = np.pad(label, pads)
    starts = [(s - t) // 2 for s, t in zip(image.shape[1:], size)]
    sl = tuple(slice(a, a + t) for a, t in zip(starts, size))
    return image[(slice(None),) + sl], (None if label is None else label[sl])


# ---------------------------------------------------------------- intensity


def random_gamma(image: np.ndarray, rng: np.random.Generator, gamma_range=(0.7, 1.5)) -> np.ndarray:
    """Gamma correction of each channel rescaled to [0, 1], then mapped back to its range."""
    out = np.empty_like(image)
    for i, c in enumerate(image):
        lo, hi = float(c.min()), float(c.max())
        if hi - lo < 1e-8:
            out[i] = c
            continue
        g = float(np.exp(rng.uniform(np.log(gamma_range[0]), np.log(gamma_range[1]))))
        out[i] = ((c - lo) / (hi - lo)) ** g * (hi - lo) + lo
    return out


def gaussian_noise(image: np.ndarray, rng: np.random.Generator, max_std: float = 0.1) -> np.ndarray:
    """Additive noise with a std drawn from [0, max_std] times the channel's std."""
    out = np.empty_like(image)
    for i, c in enumerate(image):
        std = float(rng.uniform(0.0, max_std)) * (float(c.std()) + 1e-8)
        out[i] = c + rng.standard_normal(c.shape).astype(np.float32) * std
    return out


def bias_field(image: np.ndarray, rng: np.random.Generator, strength: float = 0.3, order: int = 3) -> np.ndarray:
    """Multiply by exp(a smooth random polynomial field) of the coordinates (MRI-like shading)."""
    spatial = image.shape[1:]
    grids = np.meshgrid(*[np.linspace(-1.0, 1.0, s, dtype=np.float32) for s in spatial], indexing="ij")
    field = np.zeros(spatial, dtype=np.float32)
    for powers in np.ndindex(*([order + 1] * len(spatial))):
        if sum(powers) > order:
            continue
        term = np.ones(spatial, dtype=np.float32)
        for g, p in zip(grids, powers):
            if p:
                term = term * g ** p
        field += float(rng.uniform(-1.0, 1.0)) * term
    field = field / (np.abs(field).max() + 1e-8) * strength
    mult = np.exp(field)
    out = np.empty_like(image)
    for i, c in enumerate(image):
        lo = float(c.min())
        out[i] = (c - lo) * mult + lo  # keep the background level
    return out


@dataclass
class IntensityAugment:
    """Optional intensity augmentations, each applied with its own probability.

    Off by default (probabilities 0). ``IntensityAugment.default()`` turns all
    three on with probability 0.3 (a demo setting, not the published recipe).
    """

    gamma: float = 0.0
    noise: float = 0.0
    bias: float = 0.0
    gamma_range: Tuple[float, float] = (0.7, 1.5)
    noise_std: float = 0.1
    bias_strength: float = 0.3

    @classmethod
    def default(cls) -> "IntensityAugment":
        return cls(gamma=0.3, noise=0.3, bias=0.3)

    @classmethod
    def from_config(cls, value) -> Optional["IntensityAugment"]:
        """None/False/'none' -> None; True/'default' -> default(); a dict -> fields; a list of names -> p=0.3 each."""
        if isinstance(value, cls) or (callable(value) and not isinstance(value, (str, type))):
            return value  # an IntensityAugment or any callable(image, rng) -> image
        if value in (None, False, "none", "", []):
            return None
        if value is True or value == "default":
            return cls.default()
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            unknown = [v for v in value if v not in ("gamma", "noise", "bias")]
            if unknown:
                raise ValueError(f"intensity_aug: unknown augmentation(s) {unknown}; expected gamma, noise, bias")
            return cls(**{v: 0.3 for v in value})
        if isinstance(value, dict):
            fields = set(cls.__dataclass_fields__)
            unknown = [k for k in value if k not in fields]
            if unknown:
                raise ValueError(f"intensity_aug: unknown key(s) {unknown}; expected some of {sorted(fields)}")
            kw = dict(value)
            for k in ("gamma_range",):
                if k in kw:
                    kw[k] = tuple(kw[k])
            return cls(**kw)
        raise ValueError(f"intensity_aug: cannot interpret {value!r}")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.gamma > 0 and rng.random() < self.gamma:
            image = random_gamma(image, rng, self.gamma_range)
        if self.bias > 0 and rng.random() < self.bias:
            image = bias_field(image, rng, self.bias_strength)
        if self.noise > 0 and rng.random() < self.noise:
            image = gaussian_noise(image, rng, self.noise_std)
        return image.astype(np.float32, copy=False)


@dataclass
class TrainAugment:
    """The published training transforms.

    2D: with probability 1/2 a random rot90 + flip, else with probability 1/2 a
    random rotation in [-20, 20) degrees; then resize to the patch. Image
    resampling: ``interpolation="linear"`` (default: bilinear, angles drawn as
    floats) or ``"nearest"`` (published: ``zoom``/``rotate`` with order 0 and whole-degree
    angles -20 .. 19, as ``randint(-20, 20)``); rotated corners: ``fill="edge"``
    (default) or ``"zero"`` (published). Labels are always nearest.
    3D: random rot90 (in the first two axes) + flip, then a random crop of the
    patch (padding axes that are too short).
    Then the optional intensity augmentations.
    """

    patch_size: Tuple[int, ...]
    intensity: Optional[IntensityAugment] = None
    max_angle: float = 20.0
    interpolation: str = "linear"
    fill: str = "edge"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"TrainAugment: interpolation must be 'linear' or 'nearest', got {self.interpolation!r}")
        if self.fill not in FILLS:
            raise ValueError(f"TrainAugment: fill must be 'edge' or 'zero', got {self.fill!r}")

    def __call__(self, image, label, rng: np.random.Generator):
        if len(self.patch_size) == 2:
            order = 1 if self.interpolation == "linear" else 0
            u = rng.random()
            if u < 0.5:
                image, label = rot_flip(image, label, rng)
            elif rng.random() < 0.5:
                image, label = rotate(image, label, rng, self.max_angle, order=order, fill=self.fill,
                                      integer_angle=self.interpolation == "nearest")
            image, label = resize(image, label, self.patch_size, order=order)
        else:
            image, label = rot_flip(image, label, rng)
            image, label = random_crop(image, label, self.patch_size, rng)
        if self.intensity is not None:
            image = self.intensity(image, rng)
        return image, label
