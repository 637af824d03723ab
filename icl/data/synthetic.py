"""Tiny synthetic data sets in each supported layout (for tests and smoke runs).

Each case holds a few random ellipses (2D slices of ellipsoids in 3D) per
foreground class on a smooth background; class k has its own mean intensity
plus noise, so a small network learns the task in a few dozen iterations.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError
from .io import write_h5, write_nifti

_DEFAULTS = {
    "acdc": dict(shape=(4, 32, 32), num_classes=4),
    "la": dict(shape=(16, 16, 16), num_classes=2),
    "brats": dict(shape=(16, 16, 16), num_classes=2),
    "nifti": dict(shape=(16, 16, 16), num_classes=3),
}


def synth_case(shape: Sequence[int], num_classes: int, in_channels: int, rng: np.random.Generator,
               blobs_per_class: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """(image [C, *shape] float32, label [*shape] uint8)."""
    shape = tuple(int(s) for s in shape)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    label = np.zeros(shape, dtype=np.uint8)
    for k in range(1, num_classes):
        for _ in range(blobs_per_class):
            centre = [rng.uniform(0.25 * s, 0.75 * s) for s in shape]
            radii = [rng.uniform(0.15 * s, 0.3 * s) for s in shape]
            if len(shape) == 3 and shape[0] < 8:  # thin stacks (ACDC-like): cylinders across slices
                radii[0] = 1e6
            d = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
            label[d <= 1.0] = k
    levels = np.linspace(0.0, 1.0, num_classes).astype(np.float32)
    base = levels[label]
    ramp = sum(g / max(s - 1, 1) for g, s in zip(grids, shape)) / len(shape)
    chans = []
    for c in range(in_channels):
        img = base * (1.0 + 0.25 * c) + 0.1 * ramp + rng.normal(0.0, 0.08, size=shape).astype(np.float32)
        chans.append(img.astype(np.float32))
    return np.stack(chans), label


def make_synthetic(
    root: str,
    layout: str = "acdc",
    num_train: int = 8,
    num_val: int = 2,
    num_test: int = 2,
    shape: Optional[Sequence[int]] = None,
    num_classes: Optional[int] = None,
    in_channels: int = 1,
    seed: int = 0,
    spacing: Sequence[float] = (1.5, 1.5, 2.0),
    num_unlabeled: int = 0,
) -> Dict:
    """Write a synthetic data set at ``root`` in ``layout`` ('acdc', 'la', 'brats', 'nifti').

    acdc: volumes [Z, H, W] in data/, every slice in data/slices/, the four lists.
    la: '2018LA_Seg_Training Set/<id>/mri_norm2.h5', train.list (train+val cases), test.list.
    brats: data/<id>.h5, train.txt, val.txt, test.txt.
    nifti: imagesTr/labelsTr (train+val cases) + imagesTs/labelsTs (test), dataset.json,
    voxel size ``spacing``; ``num_unlabeled`` extra imagesTr cases without labels.
    Returns a description (layout, case lists, num_classes, shape).
    """
    if layout == "brats2019":
        layout = "brats"
    if layout not in _DEFAULTS:
        raise ConfigError(f"--layout {layout!r}: expected one of {sorted(_DEFAULTS)}")
    shape = tuple(_DEFAULTS[layout]["shape"] if shape is None else shape)
    if len(shape) != 3 or any(int(s) != s or s < 1 for s in shape):
        what = "Z H W (slices, height, width)" if layout == "acdc" else "three sizes (a volume)"
        raise ConfigError(f"--shape {' '.join(map(str, shape))}: the {layout} layout needs {what}, each positive")
    num_classes = int(_DEFAULTS[layout]["num_classes"] if num_classes is None else num_classes)
    if num_classes < 2:
        raise ConfigError(f"--num-classes {num_classes}: must be at least 2 (background + one class)")
    if num_classes > 255:
        raise ConfigError(f"--num-classes {num_classes}: synthetic labels are stored as uint8 (at most 255)")
    for flag, v, lo in (("--num-train", num_train, 1), ("--num-val", num_val, 0), ("--num-test", num_test, 0),
                        ("--in-channels", in_channels, 1), ("num_unlabeled", num_unlabeled, 0)):
        if v < lo:
            raise ConfigError(f"{flag} {v}: must be at least {lo}")
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"--out {root}: exists and is not a folder")
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    n_total = num_train + num_val + num_test

    if layout == "acdc":
        names = [f"patient{i + 1:03d}_frame01" for i in range(n_total)]
        slices_list = []
        for i, name in enumerate(names):
            img, lab = synth_case(shape, num_classes, in_channels, rng)
            vol = img[0] if in_channels == 1 else img
            write_h5(os.path.join(root, "data", f"{name}.h5"), vol, lab)
            if i < num_train:
                for z in range(shape[0]):
                    sname = f"{name}_slice_{z + 1}"
                    write_h5(os.path.join(root, "data", "slices", f"{sname}.h5"),
                             img[:, z] if in_channels > 1 else img[0, z], lab[z])
                    slices_list.append(sname)
        train, val, test = names[:num_train], names[num_train:num_train + num_val], names[num_train + num_val:]
        _write_list(os.path.join(root, "train_slices.list"), slices_list)
        _write_list(os.path.join(root, "train.list"), train)
        _write_list(os.path.join(root, "val.list"), val)
        _write_list(os.path.join(root, "test.list"), test)
    elif layout in ("la", "brats"):
        prefix = "LA" if layout == "la" else "BraTS19_synth"
        names = [f"{prefix}_{i:03d}" for i in range(n_total)]
        for name in names:
            img, lab = synth_case(shape, num_classes, in_channels, rng)
            vol = img[0] if in_channels == 1 else img
            if layout == "la":
                path = os.path.join(root, "2018LA_Seg_Training Set", name, "mri_norm2.h5")
            else:
                path = os.path.join(root, "data", f"{name}.h5")
            write_h5(path, vol, lab)
        train, val, test = names[:num_train], names[num_train:num_train + num_val], names[num_train + num_val:]
        if layout == "la":
            _write_list(os.path.join(root, "train.list"), train + val)
            _write_list(os.path.join(root, "test.list"), test)
            val = []
        else:
            _write_list(os.path.join(root, "train.txt"), train)
            _write_list(os.path.join(root, "val.txt"), val)
            _write_list(os.path.join(root, "test.txt"), test)
    else:
        names = [f"synth_{i:03d}" for i in range(n_total + num_unlabeled)]
        affine = np.diag(list(spacing) + [1.0]).astype(np.float64)
        affine[:3, 3] = [-10.0, 5.0, 2.5]
        for i, name in enumerate(names):
            img, lab = synth_case(shape, num_classes, in_channels, rng)
            is_test = num_train + num_val <= i < n_total
            folder = "Ts" if is_test else "Tr"
            for c in range(in_channels):
                # an MR-like intensity range, normalised by the reader
                write_nifti(os.path.join(root, f"images{folder}", f"{name}_{c:04d}.nii.gz"),
                            (img[c] * 400.0 + 100.0).astype(np.float32), affine)
            if i < n_total:
                write_nifti(os.path.join(root, f"labels{folder}", f"{name}.nii.gz"), lab.astype(np.uint8), affine)
        info = {
            "channel_names": {str(c): ("MRI" if c == 0 else f"MRI{c}") for c in range(in_channels)},
            "labels": {"background": 0, **{f"class{k}": k for k in range(1, num_classes)}},
            "numTraining": num_train + num_val + num_unlabeled,
            "file_ending": ".nii.gz",
        }
        with open(os.path.join(root, "dataset.json"), "w") as f:
            json.dump(info, f, indent=2)
        train = names[:num_train] + names[n_total:]
        val, test = names[num_train:num_train + num_val], names[num_train + num_val:n_total]
        val = []  # drawn by the trainer (no list in this layout)
    return {"layout": layout, "root": root, "train": train, "val": val, "test": test,
            "num_classes": num_classes, "shape": shape, "in_channels": in_channels}


def _write_list(path, names):
    with open(path, "w") as f:
        f.write("\n".join(names) + "\n")
