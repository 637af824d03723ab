"""A synthetic *lesion* population: in-distribution label scarcity for the
label-efficiency benchmark (``python -m benches.ssl --task lesions``).

The brain population (:mod:`icl.demo.population`) has its headroom in contrast:
two labeled slices of one subject already segment subjects of the same contrast
as well as full supervision does. Here every subject is drawn from one
distribution (the T1 contrast family, with jitter) and the label is a lesion
class whose appearance and place vary, so what the few labeled subjects lack is
*examples*, not a contrast:

- anatomy and imaging of each subject as in :func:`icl.demo.population.make_subject`
  (random affine + elastic deformation of the MNI template, tissue levels with
  jitter, bias field, blur, noise), only T1-like levels;
- per subject a lesion *profile*: hypo- or hyperintense, how far from the
  surrounding tissue (drawn so that a lesion can take the intensity of another
  tissue: a hypointense white-matter lesion looks like grey matter, so telling it
  apart needs shape and place), an optional rim of the opposite sign, texture;
- per slice 0 to ``max_lesions`` lesions, each an irregular ellipse (radius
  drawn log-uniformly, a smooth random perturbation of its boundary) centred in
  white matter with probability ``p_white``, elsewhere in the brain otherwise,
  blended into the image with a soft edge and the subject's noise.

Layout (what ``icl train --dataset acdc`` reads): as the brain population, but
every training subject's slices are listed subject by subject
(``train_slices.list``), so ``--labeled-num N`` labels the first N subjects,
all their slices (as ACDC counts patients). Classes: 0 not lesion, 1 lesion.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from .population import PopulationSpec, _smooth_noise, _template, make_subject
from .template import cached_meta

BUILD_VERSION = 1
CLASS_NAMES = ["background", "lesion"]


@dataclass
class LesionSpec:
    """What to generate. Defaults: the task of ``python -m benches.ssl --task lesions``."""

    size: int = 64                 # slices are size x size pixels
    train_subjects: int = 40       # training subjects (the first --labeled-num of them are labeled)
    train_slices: int = 8          # slices per training subject
    val_subjects: int = 10
    test_subjects: int = 30
    eval_slices: int = 12          # slices per validation/test volume
    seed: int = 0
    # lesions (radii in pixels of a 64-pixel slice; scaled with size)
    max_lesions: int = 3           # per slice, drawn uniformly from 0..max_lesions (at least one in 3 of 4 slices)
    min_radius: float = 2.0
    max_radius: float = 7.0
    irregularity: float = 0.35     # boundary perturbation, in units of the radius
    p_white: float = 0.7           # share of lesions centred in white matter
    contrast: Tuple[float, float] = (0.2, 0.45)  # |lesion - surrounding tissue| level, drawn per subject
    p_rim: float = 0.3             # share of subjects whose lesions have a rim of the opposite sign
    # anatomy and imaging, as the brain population (T1 family only)
    t1_jitter: float = 0.1
    max_rotation: float = 15.0
    max_scale: float = 0.15
    elastic_amplitude: float = 3.0

    def params(self) -> Dict:
        d = asdict(self)
        d["contrast"] = list(self.contrast)
        d["version"] = BUILD_VERSION
        return d

    def validate(self) -> "LesionSpec":
        if self.size < 16 or self.size % 16:
            raise ValueError(f"LesionSpec.size must be a multiple of 16 (>= 16), got {self.size}")
        for name in ("train_subjects", "train_slices", "val_subjects", "test_subjects", "eval_slices"):
            if getattr(self, name) < 1:
                raise ValueError(f"LesionSpec.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.min_radius <= self.max_radius:
            raise ValueError(f"LesionSpec radii: need 0 < min_radius <= max_radius, got {self.min_radius}, "
                             f"{self.max_radius}")
        if not 0.0 <= self.p_white <= 1.0 or not 0.0 <= self.p_rim <= 1.0:
            raise ValueError("LesionSpec.p_white and p_rim must be in [0, 1]")
        return self

    def brain_spec(self) -> PopulationSpec:
        """The anatomy and imaging part, as a brain-population spec (T1 family only)."""
        return PopulationSpec(size=self.size, labeled_slices=1, train_slices=self.train_slices, p_other=0.0,
                              t1_jitter=self.t1_jitter, max_rotation=self.max_rotation, max_scale=self.max_scale,
                              elastic_amplitude=self.elastic_amplitude, seed=self.seed)


def _profile(rng: np.random.Generator, spec: LesionSpec) -> Dict:
    return {"sign": float(rng.choice([-1.0, 1.0])), "contrast": float(rng.uniform(*spec.contrast)),
            "rim": bool(rng.random() < spec.p_rim), "texture": float(rng.uniform(0.0, 0.15))}


def add_lesions(rng: np.random.Generator, img: np.ndarray, tissue: np.ndarray, spec: LesionSpec, profile: Dict,
                noise: float) -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
    """Lesions into one slice: (image, lesion mask uint8, per-lesion draws)."""
    from scipy import ndimage

    S = img.shape[-1]
    scale = S / 64.0
    brain = ndimage.binary_erosion(tissue > 0, iterations=max(1, int(round(2 * scale))))
    out = img.astype(np.float64).copy()
    mask = np.zeros(img.shape, bool)
    drawn = []
    n = int(rng.integers(0, spec.max_lesions + 1))
    if n == 0 and rng.random() < 2 / 3:  # at least one lesion in about 3 of 4 slices
        n = 1
    yy, xx = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
    for _ in range(n):
        white = brain & (tissue == 2)
        pool = white if (rng.random() < spec.p_white and white.any()) else brain
        if not pool.any():
            break
        ys, xs = np.nonzero(pool)
        k = int(rng.integers(len(ys)))
        cy, cx = ys[k], xs[k]
        r = float(np.exp(rng.uniform(np.log(spec.min_radius), np.log(spec.max_radius)))) * scale
        ratio, ang = rng.uniform(0.5, 1.0), rng.uniform(0.0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(ang) + dy * np.sin(ang)) / r
        v = (-dx * np.sin(ang) + dy * np.cos(ang)) / (r * ratio)
        d = np.sqrt(u * u + v * v) + spec.irregularity * _smooth_noise(rng, (S, S), max(1.0, r / 2))
        m = (d < 1.0) & (tissue > 0)
        if m.sum() < 3:
            continue
        soft = np.clip(ndimage.gaussian_filter(m.astype(np.float64), 0.7), 0.0, 1.0)
        around = float(np.median(out[m]))
        level = around + profile["sign"] * profile["contrast"] * rng.uniform(0.75, 1.25)
        lesion = level * (1.0 + profile["texture"] * _smooth_noise(rng, (S, S), 1.0))
        if profile["rim"]:
            edge = m & ~ndimage.binary_erosion(m)
            lesion = np.where(edge, level - 1.5 * profile["sign"] * profile["contrast"], lesion)
        out = out * (1.0 - soft) + lesion * soft + rng.normal(0.0, noise, size=out.shape) * soft
        mask |= m
        drawn.append({"radius": round(r, 2), "pixels": int(m.sum()), "level": round(level, 3)})
    return np.clip(out, 0.0, 1.2).astype(np.float32), mask.astype(np.uint8), drawn


def make_lesion_subject(tpl, spec: LesionSpec, subject_seed, n_slices: int) -> Tuple[np.ndarray, np.ndarray, Dict]:
    img, tissue, info = make_subject(tpl, spec.brain_spec(), subject_seed, n_slices)
    rng = np.random.default_rng(list(subject_seed) + [1])
    profile = _profile(rng, spec)
    images, labels, lesions = [], [], []
    for im, ts in zip(img, tissue):
        a, b, drawn = add_lesions(rng, im, ts, spec, profile, info["noise"])
        images.append(a)
        labels.append(b)
        lesions.append(drawn)
    info = dict(info, lesion_profile=profile, lesions=lesions)
    return np.stack(images), np.stack(labels), info


def build_lesion_population(root: str, spec: Optional[LesionSpec] = None, force: bool = False, log=print,
                            progress: bool = False) -> Dict:
    """Build (or reuse, when ``meta.json`` records the same parameters) the lesion population under ``root``."""
    import h5py

    spec = (spec or LesionSpec()).validate()
    params = spec.params()
    meta = None if force else cached_meta(root, params)
    if meta is not None:
        log(f"reusing the lesion population in {root}")
        return meta
    tpl = _template()
    os.makedirs(os.path.join(root, "data", "slices"), exist_ok=True)
    roles = (["train"] * spec.train_subjects + ["val"] * spec.val_subjects + ["test"] * spec.test_subjects)
    lists: Dict[str, List[str]] = {"train_slices": [], "train": [], "val": [], "test": []}
    record = []
    it = list(enumerate(roles))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="subjects", dynamic_ncols=True)
    for idx, role in it:
        name = f"sub{idx:03d}"  # the prefix before '_' is the subject: --labeled-num counts these
        n = spec.train_slices if role == "train" else spec.eval_slices
        img, lab, info = make_lesion_subject(tpl, spec, [spec.seed, idx], n)
        record.append({"subject": name, "role": role, "lesion_pixels": int(lab.sum()), **info})
        if role == "train":
            lists["train"].append(name)
            for j, (im, lb) in enumerate(zip(img, lab)):
                sname = f"{name}_slice_{j}"
                with h5py.File(os.path.join(root, "data", "slices", sname + ".h5"), "w") as f:
                    f["image"] = im
                    f["label"] = lb
                lists["train_slices"].append(sname)
        else:
            with h5py.File(os.path.join(root, "data", name + ".h5"), "w") as f:
                f["image"] = img
                f["label"] = lab
            lists[role].append(name)
    for key, names in lists.items():
        with open(os.path.join(root, f"{key}.list"), "w") as fh:
            fh.write("\n".join(names) + "\n")
    meta = {
        "params": params,
        "source": "MNI ICBM152 2009a (nilearn bundled files), synthetic subjects with synthetic lesions",
        "classes": CLASS_NAMES,
        "counts": {k: len(v) for k, v in lists.items()},
        "lesion_share": float(np.mean([r["lesion_pixels"] for r in record])) / (
            spec.size * spec.size * np.mean([spec.train_slices if r["role"] == "train" else spec.eval_slices
                                             for r in record])),
        "subjects": record,
    }
    with open(os.path.join(root, "meta.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
    log(f"built the lesion population in {root}: {meta['counts']}")
    return meta
