"""A synthetic *population* of brains for label-efficiency benchmarks, built
offline from the MNI ICBM152 2009a template in the `nilearn` wheel.

One template gives one anatomy and one contrast, so unlabeled slices of it add
almost nothing a labeled slice does not already show (docs/methods.md, "The label-efficiency benchmark").
Here every subject is the template under its own random smooth deformation
and its own imaging, following the generative model of SynthSeg (Billot et
al., Medical Image Analysis 2023), used to make *subjects*, not to train on:

- anatomy: an in-plane affine (rotation, anisotropic scale, shear, shift), a
  smooth elastic displacement (Gaussian-filtered noise), and a per-subject
  mapping of slice positions (scale and shift along the axial axis). The
  tissue probability maps are warped with linear interpolation and the label
  is the argmax of the *warped* maps inside the warped brain mask, so labels
  and images stay aligned by construction;
- imaging: per-subject mean intensities of the three tissues (CSF/other,
  grey matter, white matter) mixed by the warped partial-volume maps, a
  smooth within-tissue texture, a multiplicative bias field, Gaussian blur,
  Gaussian noise, then brain-percentile normalisation per subject.

Contrast families (``contrast``): the labeled subject has the template's T1
order (CSF < GM < WM) at canonical levels; every other subject draws T1-like
levels with jitter (probability ``1 - p_other``) or three independent levels
(``p_other``: T2-like inversions and flat contrasts included). The split of
test subjects by family is recorded so results can be reported per family.

Layout written (what ``icl train --dataset acdc`` reads):
  <root>/data/slices/<subject>_slice_<k>.h5  training slices (image [H, W] float32, label uint8)
  <root>/data/<subject>.h5                   validation/test volumes (image/label [Z, H, W])
  <root>/train_slices.list (labeled slices first), train.list, val.list, test.list
  <root>/meta.json                           parameters, per-subject draws, counts
Classes: 0 background (outside the brain, CSF and other tissue), 1 grey matter, 2 white matter.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from .template import cached_meta, load_template

BUILD_VERSION = 1
CLASS_NAMES = ["background", "grey matter", "white matter"]
T1_LEVELS = (0.25, 0.55, 0.85)  # CSF/other, GM, WM: the labeled subject's contrast


@dataclass
class PopulationSpec:
    """What to generate. Defaults: the benchmark task of ``python -m benches.ssl``."""

    size: int = 48                 # output slices are size x size pixels (about 3.3 mm)
    labeled_slices: int = 2        # labeled slices of the labeled subject (listed first)
    train_slices: int = 8          # slices per training subject
    unlabeled_subjects: int = 40   # training subjects besides the labeled one
    val_subjects: int = 10
    test_subjects: int = 30
    eval_slices: int = 12          # slices per validation/test volume
    seed: int = 0                  # the population's seed (anatomy and imaging of every subject)
    # anatomy
    max_rotation: float = 12.0     # degrees
    max_scale: float = 0.12        # +- per axis
    max_shear: float = 0.08
    max_shift: float = 0.06        # fraction of the field of view
    elastic_sigma: float = 6.0     # pixels of the output grid
    elastic_amplitude: float = 2.5  # pixels
    z_scale: float = 0.1           # +- stretch of the axial positions
    z_shift: float = 4.0           # +- template slices
    # imaging
    p_other: float = 0.5           # share of subjects with arbitrary tissue levels (any order)
    t1_jitter: float = 0.15        # +- on each tissue level for T1-like subjects
    texture: float = 0.05
    max_bias: float = 0.3
    max_blur: float = 1.0         # Gaussian sigma in pixels
    noise: Tuple[float, float] = (0.01, 0.05)

    def params(self) -> Dict:
        d = asdict(self)
        d["noise"] = list(self.noise)
        d["version"] = BUILD_VERSION
        return d

    def validate(self) -> "PopulationSpec":
        if self.size < 16 or self.size % 16:
            raise ValueError(f"PopulationSpec.size must be a multiple of 16 (>= 16), got {self.size}")
        if not 1 <= self.labeled_slices <= self.train_slices:
            raise ValueError(f"PopulationSpec.labeled_slices must be in 1..train_slices ({self.train_slices}), "
                             f"got {self.labeled_slices}")
        for name in ("unlabeled_subjects", "val_subjects", "test_subjects"):
            if getattr(self, name) < 1:
                raise ValueError(f"PopulationSpec.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.p_other <= 1.0:
            raise ValueError(f"PopulationSpec.p_other must be in [0, 1], got {self.p_other}")
        return self


@dataclass
class _Template:
    """Tissue probabilities (CSF/other, GM, WM; sum 1 inside the brain) and the brain
    mask, cropped in-plane to a square around the brain, axial range with tissue."""

    probs: np.ndarray   # [3, S, S, Z] float32
    brain: np.ndarray   # [S, S, Z] float32 (0/1)
    z_range: Tuple[int, int]


def _template(min_tissue: int = 1000) -> _Template:
    vol = load_template()
    t1, gm, wm = vol["t1"], vol["gm"], vol["wm"]
    brain = t1 > 0
    other = np.clip(255.0 - gm - wm, 0.0, None)
    probs = np.stack([other, gm, wm]).astype(np.float32)
    probs /= np.maximum(probs.sum(0, keepdims=True), 1e-6)
    probs *= brain
    tissue = np.argmax(probs, axis=0) * brain
    per_z = (tissue > 0).reshape(-1, tissue.shape[2]).sum(0)
    zs = np.nonzero(per_z >= min_tissue)[0]
    xs, ys = np.nonzero(brain.any(axis=2))
    cx, cy = (xs.min() + xs.max()) // 2, (ys.min() + ys.max()) // 2
    side = int(max(xs.max() - xs.min(), ys.max() - ys.min()) + 12)
    x0, y0 = int(cx - side // 2), int(cy - side // 2)

    def crop(a):
        out = np.zeros(a.shape[:-3] + (side, side, a.shape[-1]), a.dtype)
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + side, a.shape[-3]), min(y0 + side, a.shape[-2])
        out[..., xa - x0: xb - x0, ya - y0: yb - y0, :] = a[..., xa:xb, ya:yb, :]
        return out

    return _Template(crop(probs), crop(brain.astype(np.float32)), (int(zs.min()), int(zs.max())))


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Zero-mean Gaussian-filtered noise scaled to unit max-abs."""
    from scipy import ndimage

    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return f / (np.abs(f).max() + 1e-8)


def _draw_contrast(rng: np.random.Generator, spec: PopulationSpec, canonical: bool) -> Tuple[str, List[float]]:
    if canonical:
        return "t1", list(T1_LEVELS)
    if rng.random() < spec.p_other:
        while True:  # arbitrary levels, but keep GM and WM distinguishable from each other
            lv = rng.uniform(0.05, 1.0, size=3)
            if abs(lv[1] - lv[2]) >= 0.12:
                family = "t1" if lv[0] < lv[1] < lv[2] else "other"
                return family, [float(v) for v in lv]
    lv = np.array(T1_LEVELS) + rng.uniform(-spec.t1_jitter, spec.t1_jitter, size=3)
    return "t1", [float(v) for v in lv]


def make_subject(tpl: _Template, spec: PopulationSpec, subject_seed, n_slices: int,
                 canonical: bool = False) -> Tuple[np.ndarray, np.ndarray, Dict]:
    """One synthetic subject: image [n, H, W] float32 in about [0, 1], label [n, H, W] uint8, and its draws."""
    from scipy import ndimage

    rng = np.random.default_rng(subject_seed)
    S = spec.size
    side = tpl.brain.shape[0]
    # ---- anatomy: an in-plane affine + elastic field on a [-1, 1] grid, axial mapping
    ang = np.deg2rad(rng.uniform(-spec.max_rotation, spec.max_rotation))
    sc = 1.0 + rng.uniform(-spec.max_scale, spec.max_scale, size=2)
    sh = rng.uniform(-spec.max_shear, spec.max_shear)
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    A = rot @ np.array([[1.0, sh], [0.0, 1.0]]) @ np.diag(1.0 / sc)  # output -> template (inverse map)
    t = rng.uniform(-spec.max_shift, spec.max_shift, size=2)
    u = (np.arange(S) + 0.5) / S * 2.0 - 1.0
    gu, gv = np.meshgrid(u, u, indexing="ij")
    pts = np.stack([gu, gv]).reshape(2, -1)
    src = (A @ pts + t[:, None]).reshape(2, S, S)
    amp = rng.uniform(0.3, 1.0) * spec.elastic_amplitude
    for d in range(2):  # elastic displacement, amplitude in output pixels -> [-1, 1] units
        src[d] += _smooth_noise(rng, (S, S), spec.elastic_sigma) * amp * 2.0 / S
    xs = (src[0] + 1.0) / 2.0 * side - 0.5
    ys = (src[1] + 1.0) / 2.0 * side - 0.5
    z_lo, z_hi = tpl.z_range
    zc = (z_lo + z_hi) / 2.0
    zsc = 1.0 + rng.uniform(-spec.z_scale, spec.z_scale)
    zsh = rng.uniform(-spec.z_shift, spec.z_shift)
    margin = 0.08 * (z_hi - z_lo)  # stay inside the tissue range after the axial mapping
    nominal = np.linspace(z_lo + margin, z_hi - margin, n_slices)
    nominal += rng.uniform(-0.4, 0.4) * (nominal[1] - nominal[0] if n_slices > 1 else 0.0)
    zpos = np.clip(zc + (nominal - zc) * zsc + zsh, z_lo, z_hi)
    # ---- imaging draws
    family, levels = _draw_contrast(rng, spec, canonical)
    bias = rng.uniform(0.0, spec.max_bias)
    blur = rng.uniform(0.0, spec.max_blur)
    noise = rng.uniform(*spec.noise)
    images, labels = [], []
    for z in zpos:
        coords = np.stack([xs, ys, np.full_like(xs, z)])
        probs = np.stack([ndimage.map_coordinates(p, coords, order=1, mode="constant") for p in tpl.probs])
        bmask = ndimage.map_coordinates(tpl.brain, coords, order=1, mode="constant") > 0.5
        probs = probs / np.maximum(probs.sum(0, keepdims=True), 1e-6)
        lab = (np.argmax(probs, axis=0) * bmask).astype(np.uint8)
        tex = [1.0 + spec.texture * _smooth_noise(rng, (S, S), 1.5) for _ in range(3)]
        img = sum(lv * p * tx for lv, p, tx in zip(levels, probs, tex)) * bmask
        images.append(img)
        labels.append(lab)
    img = np.stack(images).astype(np.float64)
    field_ = np.exp(bias * _smooth_noise(rng, (S, S), S / 4.0))
    img = img * field_[None]
    if blur > 0.05:
        img = np.stack([ndimage.gaussian_filter(s, blur) for s in img])
    brain_px = np.stack(labels) > 0
    brain_px |= img > 1e-3
    img = img + rng.normal(0.0, noise, size=img.shape) * brain_px.any(0, keepdims=True)
    hi = np.percentile(img[brain_px], 99.5) if brain_px.any() else 1.0
    img = np.clip(img / max(hi, 1e-6), 0.0, 1.2)
    # anterior up, as in the demo slices
    img = np.rot90(img, axes=(1, 2)).astype(np.float32).copy()
    lab = np.rot90(np.stack(labels), axes=(1, 2)).copy()
    info = {"contrast": family, "levels": [round(v, 4) for v in levels], "rotation_deg": round(float(np.rad2deg(ang)), 2),
            "scale": [round(float(v), 4) for v in sc], "bias": round(float(bias), 4), "blur": round(float(blur), 4),
            "noise": round(float(noise), 4), "z": [round(float(v), 2) for v in zpos]}
    return img, lab, info


def build_population(root: str, spec: Optional[PopulationSpec] = None, force: bool = False,
                     log=print, progress: bool = False) -> Dict:
    """Build (or reuse, when ``meta.json`` records the same parameters) the population under ``root``."""
    import h5py

    spec = (spec or PopulationSpec()).validate()
    meta_path = os.path.join(root, "meta.json")
    params = spec.params()
    meta = None if force else cached_meta(root, params)
    if meta is not None:
        log(f"reusing the population in {root}")
        return meta
    tpl = _template()
    os.makedirs(os.path.join(root, "data", "slices"), exist_ok=True)
    subjects: List[Tuple[str, str, int, bool]] = [("sub000", "labeled", spec.train_slices, True)]
    subjects += [(f"sub{i:03d}", "train", spec.train_slices, False) for i in range(1, spec.unlabeled_subjects + 1)]
    k = spec.unlabeled_subjects + 1
    subjects += [(f"sub{i:03d}", "val", spec.eval_slices, False) for i in range(k, k + spec.val_subjects)]
    k += spec.val_subjects
    subjects += [(f"sub{i:03d}", "test", spec.eval_slices, False) for i in range(k, k + spec.test_subjects)]
    lists: Dict[str, List[str]] = {"train_slices": [], "train": [], "val": [], "test": []}
    labeled: List[str] = []
    record = []
    it = subjects
    if progress:
        from tqdm import tqdm

        it = tqdm(subjects, desc="subjects", dynamic_ncols=True)
    for name, role, n, canonical in it:
        idx = int(name[3:])
        img, lab, info = make_subject(tpl, spec, [spec.seed, idx], n, canonical=canonical)
        record.append({"subject": name, "role": role, **info})
        if role in ("labeled", "train"):
            lists["train"].append(name)
            names = []
            for j, (im, lb) in enumerate(zip(img, lab)):
                sname = f"{name}_slice_{j}"
                with h5py.File(os.path.join(root, "data", "slices", sname + ".h5"), "w") as f:
                    f["image"] = im
                    f["label"] = lb
                names.append(sname)
            if role == "labeled":  # the labeled slices: spread over the subject's axial range
                pick = np.unique(np.round(np.linspace(0, n - 1, spec.labeled_slices + 2)[1:-1]).astype(int))
                pick = list(pick) + [j for j in range(n) if j not in pick][: spec.labeled_slices - len(pick)]
                labeled = [names[j] for j in sorted(pick)]
                names = [s for s in names if s not in labeled]
            lists["train_slices"].extend(names)
        else:
            with h5py.File(os.path.join(root, "data", name + ".h5"), "w") as f:
                f["image"] = img
                f["label"] = lab
            lists[role].append(name)
    lists["train_slices"] = labeled + lists["train_slices"]
    for key, names in lists.items():
        with open(os.path.join(root, f"{key}.list"), "w") as fh:
            fh.write("\n".join(names) + "\n")
    n_train = len(lists["train_slices"])
    meta = {
        "params": params,
        "source": "MNI ICBM152 2009a (nilearn bundled files), synthetic subjects",
        "classes": CLASS_NAMES,
        "counts": {k: len(v) for k, v in lists.items()},
        "labeled_slices": labeled,
        "labeled_fraction": len(labeled) / n_train,
        "test_contrast": {r["subject"]: r["contrast"] for r in record if r["role"] == "test"},
        "subjects": record,
    }
    with open(meta_path, "w") as fh:
        json.dump(meta, fh, indent=1)
    log(f"built the population in {root}: {meta['counts']}")
    return meta
