"""A small, honest 2D brain-tissue segmentation set built offline from the MNI
ICBM152 2009a template that ships inside the `nilearn` wheel.

Classes: 0 background (outside the brain, and CSF / other brain tissue),
1 grey matter, 2 white matter. The T1 template is skull-stripped (t1 > 0 is the
brain mask); inside it a voxel is GM or WM where that tissue's probability
map wins the argmax of (255 - gm - wm, gm, wm) after resampling.

Leak-free split: the axial range holding brain is cut into slabs of `slab`
slices separated by `gap` slices that belong to no split; whole slabs go to
train / validation / test, so no slice nor its neighbour crosses splits (only
axial slices are used: a coronal or sagittal slice would cross the slabs).

Layout written (what `icl train --dataset acdc` reads, SSL4MIS style):
  <root>/data/slices/<name>.h5   training slices, keys image [H, W] float32, label [H, W] uint8
  <root>/data/<case>.h5          validation/test volumes, image/label [D, H, W]
  <root>/train_slices.list, train.list, val.list, test.list, test_corrupted.list
  <root>/meta.json               how it was built (split, normalisation, corruption seed)
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
CLASS_NAMES = ["background", "grey matter", "white matter"]
BUILD_VERSION = 1


class MissingDemoDependency(RuntimeError):
    pass


def template_dir() -> str:
    try:
        import nilearn  # noqa: F401
        import nibabel  # noqa: F401
    except ImportError as exc:
        raise MissingDemoDependency(
            f"the demo needs nilearn and nibabel ({exc}); install them with: pip install nilearn nibabel"
        ) from exc
    import nilearn

    path = os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data")
    for name in TEMPLATE_FILES.values():
        if not os.path.isfile(os.path.join(path, name)):
            raise MissingDemoDependency(f"the nilearn package lacks its bundled template file {name} (looked in {path})")
    return path


def load_template() -> Dict[str, np.ndarray]:
    import nibabel as nib

    path = template_dir()
    return {k: np.asarray(nib.load(os.path.join(path, f)).dataobj).astype(np.float32) for k, f in TEMPLATE_FILES.items()}


def _resize(a: np.ndarray, size: int, order: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.zoom(a, (size / a.shape[0], size / a.shape[1]), order=order, prefilter=False)


def smooth_field(rng: np.random.Generator, size: int, grid: int = 4) -> np.ndarray:
    """A smooth random field in about [-1, 1] (coarse noise upsampled)."""
    from scipy import ndimage

    coarse = rng.uniform(-1.0, 1.0, size=(grid, grid))
    return ndimage.zoom(coarse, size / grid, order=3)[:size, :size]


def corrupt(img: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Scanner-like intensity corruption of a [0, 1] image: smooth multiplicative
    bias field, gamma change, contrast/brightness shift and Gaussian noise."""
    out = np.clip(img, 0.0, 1.0)
    field = np.exp(0.35 * strength * smooth_field(rng, img.shape[0]))
    out = out * field
    gamma = float(np.exp(rng.uniform(-0.6, 0.6) * strength))
    out = np.clip(out, 0.0, None) ** gamma
    out = out * rng.uniform(1 - 0.2 * strength, 1 + 0.2 * strength) + rng.uniform(-0.08, 0.08) * strength
    out = out + rng.normal(0.0, 0.05 * strength, size=img.shape)
    return out.astype(np.float32)


def _slabs(z_lo: int, z_hi: int, slab: int, gap: int, pattern: List[str]) -> List[Tuple[str, List[int]]]:
    out, z, i = [], z_lo, 0
    while z + slab // 2 <= z_hi:  # keep a last slab if at least half of it fits
        zs = list(range(z, min(z + slab, z_hi + 1)))
        out.append((pattern[i % len(pattern)], zs))
        z += slab + gap
        i += 1
    return out


def build(root: str, size: int = 96, slab: int = 10, gap: int = 3, seed: int = 0, min_tissue: int = 1000,
          force: bool = False, log=print) -> Dict:
    """Build (or reuse) the data set under `root`; returns its meta.json content."""
    import h5py

    meta_path = os.path.join(root, "meta.json")
    params = {"size": size, "slab": slab, "gap": gap, "seed": seed, "min_tissue": min_tissue, "version": BUILD_VERSION}
    meta = None if force else cached_meta(root, params)
    if meta is not None:
        log(f"reusing the demo data set in {root}")
        return meta
    vol = load_template()
    t1, gm, wm = vol["t1"], vol["gm"], vol["wm"]
    brain = t1 > 0
    # Percentile normalisation over brain voxels (one setting for the whole volume;
    # a per-slice z-score would throw away the intensity scale the task relies on).
    lo, hi = np.percentile(t1[brain], [0.5, 99.5])
    norm = np.clip((t1 - lo) / (hi - lo), 0.0, 1.0) * brain
    tissue = np.argmax(np.stack([255.0 - gm - wm, gm, wm]), axis=0) * brain
    per_z = (tissue > 0).reshape(-1, tissue.shape[2]).sum(0)
    zs = np.nonzero(per_z >= min_tissue)[0]
    z_lo, z_hi = int(zs.min()), int(zs.max())
    xs, ys = np.nonzero(brain.any(axis=2))
    cx, cy = (xs.min() + xs.max()) // 2, (ys.min() + ys.max()) // 2
    side = max(xs.max() - xs.min(), ys.max() - ys.min()) + 8
    x0, y0 = int(cx - side // 2), int(cy - side // 2)

    def crop(a: np.ndarray) -> np.ndarray:
        pad = np.zeros((side, side) + a.shape[2:], a.dtype)
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + side, a.shape[0]), min(y0 + side, a.shape[1])
        pad[xa - x0: xb - x0, ya - y0: yb - y0] = a[xa:xb, ya:yb]
        return pad

    def make_slice(z: int) -> Tuple[np.ndarray, np.ndarray]:
        img = _resize(crop(norm[:, :, z]), size, order=1)
        b = _resize(crop(brain[:, :, z].astype(np.float32)), size, order=1) > 0.5
        probs = [_resize(crop(p[:, :, z]), size, order=1) for p in (255.0 - gm - wm, gm, wm)]
        lab = (np.argmax(np.stack(probs), axis=0) * b).astype(np.uint8)
        # rotate so that anterior is up (the template's y axis points anterior)
        return np.rot90(img * b).astype(np.float32).copy(), np.rot90(lab).copy()

    os.makedirs(os.path.join(root, "data", "slices"), exist_ok=True)
    slabs = _slabs(z_lo, z_hi, slab, gap, ["train", "test", "train", "val"])
    lists: Dict[str, List[str]] = {"train_slices": [], "train": [], "val": [], "test": [], "test_corrupted": []}
    rng = np.random.default_rng(seed + 1000)
    split_record = []
    for i, (split, zlist) in enumerate(slabs):
        case = f"mni_slab{i:02d}"
        imgs, labs = zip(*(make_slice(z) for z in zlist))
        split_record.append({"case": case, "split": split, "z": [int(z) for z in zlist]})
        if split == "train":
            lists["train"].append(case)
            for z, im, lb in zip(zlist, imgs, labs):
                name = f"{case}_slice_{z}"
                with h5py.File(os.path.join(root, "data", "slices", name + ".h5"), "w") as f:
                    f["image"] = im
                    f["label"] = lb
                lists["train_slices"].append(name)
        else:
            with h5py.File(os.path.join(root, "data", case + ".h5"), "w") as f:
                f["image"] = np.stack(imgs)
                f["label"] = np.stack(labs)
            lists[split].append(case)
            if split == "test":
                bad = np.stack([corrupt(im, rng) for im in imgs])
                with h5py.File(os.path.join(root, "data", case + "_corrupted.h5"), "w") as f:
                    f["image"] = bad
                    f["label"] = np.stack(labs)
                lists["test_corrupted"].append(case + "_corrupted")
    # Labeled slices are the first ones of train_slices.list: put the slices with
    # the most tissue of each training slab first (one per slab, central slabs
    # first), then the rest in a seeded order.
    lists["train_slices"] = _order_for_labeling(root, lists["train_slices"], seed)
    for key, names in lists.items():
        with open(os.path.join(root, f"{key}.list"), "w") as fh:
            fh.write("\n".join(names) + "\n")
    fractions = np.bincount(
        np.concatenate([_read(root, "data/slices/" + n)[1].ravel() for n in lists["train_slices"]]), minlength=3
    ) / (len(lists["train_slices"]) * size * size)
    meta = {
        "params": params,
        "source": "MNI ICBM152 2009a (nilearn bundled files): " + ", ".join(TEMPLATE_FILES.values()),
        "classes": CLASS_NAMES,
        "normalisation": {"percentiles": [0.5, 99.5], "values": [float(lo), float(hi)], "over": "brain voxels of the volume"},
        "crop": {"x0": x0, "y0": y0, "side": int(side), "pixel_mm": round(side / size, 3)},
        "axial_range": [z_lo, z_hi],
        "slabs": split_record,
        "counts": {k: len(v) for k, v in lists.items()},
        "train_pixel_fractions": [round(float(f), 4) for f in fractions],
        "corruption": {"seed": seed + 1000, "what": "bias field exp(0.35 f), gamma exp(U(-.6,.6)), contrast U(.8,1.2), offset U(-.08,.08), noise N(0, .05)"},
    }
    with open(meta_path, "w") as fh:
        json.dump(meta, fh, indent=2)
    log(f"built the demo data set in {root}: {meta['counts']}")
    return meta


def cached_meta(root: str, params: Dict) -> Optional[Dict]:
    """``<root>/meta.json`` when it records exactly ``params`` (a data set built
    with the same settings), else None."""
    meta_path = os.path.join(root, "meta.json")
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path) as fh:
        meta = json.load(fh)
    return meta if meta.get("params") == params else None


def _read(root: str, rel: str) -> Tuple[np.ndarray, np.ndarray]:
    import h5py

    with h5py.File(os.path.join(root, rel + ".h5"), "r") as f:
        return f["image"][()], f["label"][()]


def _order_for_labeling(root: str, names: List[str], seed: int) -> List[str]:
    by_slab: Dict[str, List[Tuple[int, str]]] = {}
    for n in names:
        lab = _read(root, "data/slices/" + n)[1]
        by_slab.setdefault(n.rsplit("_slice_", 1)[0], []).append((int((lab > 0).sum()), n))
    ordered = sorted(by_slab)
    centre = (len(ordered) - 1) / 2
    slabs = sorted(ordered, key=lambda s: abs(ordered.index(s) - centre))
    first = [max(by_slab[s])[1] for s in slabs]
    rest = [n for n in names if n not in first]
    rng = np.random.default_rng(seed)
    rest = [rest[i] for i in rng.permutation(len(rest))]
    return first + rest


def load_split(root: str, split: str) -> List[Tuple[str, np.ndarray, np.ndarray]]:
    """[(case, image [D, H, W], label [D, H, W])] of a volume split (val, test, test_corrupted)."""
    with open(os.path.join(root, f"{split}.list")) as fh:
        cases = [l.strip() for l in fh if l.strip()]
    return [(c,) + _read(root, "data/" + c) for c in cases]


def load_train_slices(root: str) -> List[Tuple[str, np.ndarray, np.ndarray]]:
    with open(os.path.join(root, "train_slices.list")) as fh:
        names = [l.strip() for l in fh if l.strip()]
    return [(n,) + _read(root, "data/slices/" + n) for n in names]
