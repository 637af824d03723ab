"""Data sources: one class per on-disk layout.

A source knows the case lists of each split, how to read one case for
evaluation (:meth:`load_case`) and how to enumerate and read training items
(:meth:`train_items`, :meth:`load_item`): 2D slices for 2D models, whole
volumes for 3D models.
"""
from __future__ import annotations

import abc
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .io import Case, DataError, check_finite, h5_shape, read_h5, read_list, read_nifti
from . import preprocess as pp

LAYOUTS = ("acdc", "la", "brats2019", "nifti")
DATASETS = LAYOUTS + ("synthetic",)


@dataclass(frozen=True)
class Item:
    """A training item: ``case`` names the case it belongs to (labeled subsets count cases);
    ``path`` is the file; ``index`` the slice along ``axis`` for 2D items cut from volumes."""

    case: str
    path: str
    index: Optional[int] = None
    axis: Optional[int] = None
    labeled: bool = True


class Source(abc.ABC):
    """Base class. Subclasses set ``layout`` and implement the split lists and readers."""

    layout = "base"
    slice_axis = 2  # spatial axis along which 2D models cut volumes
    volume_dims = 3

    def __init__(self, root: str, num_classes: Optional[int] = None, **options):
        if not os.path.isdir(root):
            raise DataError(f"{root}: data root not found (expected a directory)")
        self.root = root
        self.num_classes = num_classes
        self.options = options
        if options.get("slice_axis") is not None:
            self.slice_axis = int(options["slice_axis"])
        self.spacing = tuple(options["spacing"]) if options.get("spacing") else None

    # -- splits ---------------------------------------------------------------
    @abc.abstractmethod
    def has_split(self, split: str) -> bool:
        """Implemented by each layout."""

    @abc.abstractmethod
    def cases(self, split: str) -> List[str]:
        """Implemented by each layout."""

    # -- evaluation -----------------------------------------------------------
    @abc.abstractmethod
    def case_path(self, name: str) -> str:
        """Implemented by each layout."""

    def load_case(self, name: str, need_label: bool = True) -> Case:
        path = self.case_path(name)
        image, label = read_h5(path, self.volume_dims, self.num_classes, need_label=need_label)
        return Case(name=name, image=image, label=label, spacing=self.spacing, path=path)

    # -- training -------------------------------------------------------------
    def train_items(self, spatial_dims: int) -> List[Item]:
        """Training items in list order; 2D items of a volume data set are its slices."""
        items = []
        for name in self.cases("train"):
            path = self.case_path(name)
            if spatial_dims == self.volume_dims:
                items.append(Item(name, path))
            else:
                shape = h5_shape(path)
                n = shape[len(shape) - self.volume_dims + self.slice_axis]
                items.extend(Item(name, path, i, self.slice_axis) for i in range(n))
        return items

    def load_item(self, item: Item) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        if item.index is None:
            return read_h5(item.path, self.item_dims(item), self.num_classes, need_label=item.labeled)
        return read_h5(item.path, self.volume_dims, self.num_classes, need_label=item.labeled,
                       index=(item.axis, item.index))

    def item_dims(self, item: Item) -> int:
        return self.volume_dims

    def labeled_count(self, items: List[Item], labeled_num: int, spatial_dims: int) -> int:
        """How many leading items the first ``labeled_num`` cases make up."""
        order: List[str] = []
        for it in items:
            if not order or order[-1] != it.case:
                if it.case not in order:
                    order.append(it.case)
        if labeled_num > len(order):
            raise DataError(
                f"--labeled-num {labeled_num}: the training split of {self.root} has only {len(order)} cases"
            )
        keep = set(order[:labeled_num])
        n = 0
        for it in items:
            if it.case not in keep:
                break
            n += 1
        return n

    def preprocessing(self) -> Dict:
        """What must be done to a raw input file before the model sees it (stored in checkpoints)."""
        return {"layout": self.layout, "slice_axis": self.slice_axis, "normalization": None,
                "target_spacing": None}

    def describe(self) -> str:
        return f"{self.layout} at {self.root}"


def _list_path(root: str, *names: str) -> Optional[str]:
    for n in names:
        p = os.path.join(root, n)
        if os.path.isfile(p):
            return p
    return None


class ACDCSource(Source):
    """SSL4MIS ACDC: ``data/slices/<slice>.h5`` (training), ``data/<case>.h5`` (volumes, [Z, H, W])."""

    layout = "acdc"
    slice_axis = 0
    TABLE = {3: 68, 7: 136, 14: 256, 21: 396, 28: 512, 35: 664, 140: 1312}

    def __init__(self, root, num_classes=None, use_table: bool = True, **options):
        super().__init__(root, num_classes, **options)
        self.use_table = use_table
        if not os.path.isdir(os.path.join(root, "data")):
            raise DataError(f"{root}: no 'data' folder; expected the SSL4MIS ACDC layout (data/slices/*.h5, data/<case>.h5)")

    def has_split(self, split):
        return _list_path(self.root, f"{split}.list") is not None

    def cases(self, split):
        p = _list_path(self.root, f"{split}.list")
        if p is None:
            raise DataError(f"{os.path.join(self.root, split + '.list')}: list file not found")
        return read_list(p)

    def case_path(self, name):
        return os.path.join(self.root, "data", f"{name}.h5")

    def train_items(self, spatial_dims):
        if spatial_dims == 3:
            return [Item(n, self.case_path(n)) for n in self.cases("train")]
        names = read_list(os.path.join(self.root, "train_slices.list"))
        items = []
        for n in names:
            case = n.split("_slice")[0]
            items.append(Item(case, os.path.join(self.root, "data", "slices", f"{n}.h5")))
        return items

    def item_dims(self, item):
        return 2 if os.path.basename(os.path.dirname(item.path)) == "slices" else 3

    def labeled_count(self, items, labeled_num, spatial_dims):
        if spatial_dims == 3:
            return super().labeled_count(items, labeled_num, spatial_dims)
        if self.use_table:
            if labeled_num not in self.TABLE:
                table = ", ".join(f"{k}->{v}" for k, v in self.TABLE.items())
                raise DataError(
                    f"--labeled-num {labeled_num} is not in the ACDC table of patients to slices ({table}); "
                    f"use one of these or --labeled-fraction"
                )
            n = self.TABLE[labeled_num]
            if n > len(items):
                raise DataError(f"--labeled-num {labeled_num} means {n} slices but train_slices.list has {len(items)}")
            return n
        # generic: count the slices of the first N patients (prefix before the first '_')
        patients: List[str] = []
        n = 0
        for it in items:
            p = it.case.split("_")[0]
            if p not in patients:
                if len(patients) == labeled_num:
                    break
                patients.append(p)
            n += 1
        if len(patients) < labeled_num:
            raise DataError(f"--labeled-num {labeled_num}: {self.root} has only {len(patients)} training patients")
        return n


class LASource(Source):
    """UA-MT left atrium: ``2018LA_Seg_Training Set/<id>/mri_norm2.h5``, ``train.list``, ``test.list``."""

    layout = "la"
    FOLDER = "2018LA_Seg_Training Set"

    def __init__(self, root, num_classes=None, **options):
        super().__init__(root, num_classes, **options)
        if not os.path.isdir(os.path.join(root, self.FOLDER)):
            raise DataError(f"{root}: no '{self.FOLDER}' folder; expected the LA layout (<id>/mri_norm2.h5)")

    def has_split(self, split):
        return _list_path(self.root, f"{split}.list") is not None

    def cases(self, split):
        p = _list_path(self.root, f"{split}.list")
        if p is None:
            raise DataError(f"{os.path.join(self.root, split + '.list')}: list file not found")
        return read_list(p)

    def case_path(self, name):
        return os.path.join(self.root, self.FOLDER, name, "mri_norm2.h5")


class BraTSSource(Source):
    """SSL4MIS BraTS2019: ``data/<id>.h5``, ``train.txt``, ``val.txt``, ``test.txt``."""

    layout = "brats2019"

    def __init__(self, root, num_classes=None, **options):
        super().__init__(root, num_classes, **options)
        if not os.path.isdir(os.path.join(root, "data")):
            raise DataError(f"{root}: no 'data' folder; expected the BraTS2019 layout (data/<id>.h5)")

    def has_split(self, split):
        return _list_path(self.root, f"{split}.txt", f"{split}.list") is not None

    def cases(self, split):
        p = _list_path(self.root, f"{split}.txt", f"{split}.list")
        if p is None:
            raise DataError(f"{os.path.join(self.root, split + '.txt')}: list file not found")
        return read_list(p)

    def case_path(self, name):
        return os.path.join(self.root, "data", f"{name}.h5")


class NiftiSource(Source):
    """nnU-Net raw layout: ``imagesTr/<case>_<XXXX><ending>`` (one file per channel),
    ``labelsTr/<case><ending>``, ``dataset.json``; optional ``imagesTs``/``labelsTs``.

    Images without a label in ``labelsTr`` are used as unlabeled training data.
    Optional ``train.list``/``val.list``/``test.list`` at the root fix the splits.
    Each case is normalised per channel (scheme from the modality names) and
    optionally resampled to ``target_spacing``; training reads a cache of the
    preprocessed arrays (``cache_dir``), evaluation and prediction preprocess
    on the fly and map predictions back to the original grid.
    """

    layout = "nifti"

    def __init__(self, root, num_classes=None, normalization=None, target_spacing=None,
                 ct_window=pp.DEFAULT_CT_WINDOW, cache_dir=None, **options):
        super().__init__(root, num_classes, **options)
        js = os.path.join(root, "dataset.json")
        if not os.path.isfile(js):
            raise DataError(f"{js}: not found; expected the nnU-Net raw layout (imagesTr/, labelsTr/, dataset.json)")
        try:
            with open(js) as f:
                self.info = json.load(f)
        except (OSError, ValueError) as exc:
            raise DataError(f"{js}: cannot parse ({exc})") from exc
        self.ending, self.modalities = _check_dataset_json(self.info, js)
        if normalization is None:
            self.schemes = [pp.scheme_for_modality(m) for m in self.modalities]
        else:
            sch = [normalization] if isinstance(normalization, str) else list(normalization)
            if len(sch) == 1:
                sch = sch * len(self.modalities)
            bad = [s for s in sch if s not in pp.SCHEMES]
            if bad:
                raise DataError(f"--normalization {bad}: unknown scheme; expected one of {pp.SCHEMES}")
            if len(sch) != len(self.modalities):
                raise DataError(f"--normalization: {len(sch)} schemes for {len(self.modalities)} channels of {js}")
            self.schemes = sch
        self.ct_window = tuple(float(v) for v in (ct_window or pp.DEFAULT_CT_WINDOW))
        self.target_spacing = tuple(float(v) for v in target_spacing) if target_spacing else None
        self.cache_dir = cache_dir
        self._warned_test = False
        labels = self.info.get("labels")
        if num_classes is not None and isinstance(labels, dict) and labels and len(labels) != num_classes:
            warnings.warn(f"{js} lists {len(labels)} labels but num_classes is {num_classes}")
        self._scan()

    def _scan(self):
        pat = re.compile(r"^(.*)_(\d{4})" + re.escape(self.ending) + "$")
        self._images: Dict[str, Dict[str, List[str]]] = {}
        for folder in ("imagesTr", "imagesTs"):
            d = os.path.join(self.root, folder)
            found: Dict[str, Dict[int, str]] = {}
            files = sorted(fn for fn in os.listdir(d) if fn.endswith(self.ending)) if os.path.isdir(d) else []
            n_ch = len(self.modalities)
            matches = [pat.match(fn) for fn in files]
            nnunet = all(m is not None and int(m.group(2)) < n_ch for m in matches)
            if not nnunet and n_ch == 1:
                # Decathlon style (one channel, <case><ending>): e.g. AMOS's imagesTr/amos_0016.nii.gz
                for fn in files:
                    found[fn[: -len(self.ending)]] = {0: os.path.join(d, fn)}
            else:
                for fn, m in zip(files, matches):
                    if m:
                        found.setdefault(m.group(1), {})[int(m.group(2))] = os.path.join(d, fn)
            cases = {}
            for case, chans in found.items():
                want = list(range(len(self.modalities)))
                if sorted(chans) != want:
                    raise DataError(
                        f"{os.path.join(d, case)}: channel files {sorted(chans)} found; expected "
                        f"{['%04d' % c for c in want]} (dataset.json names {len(want)} channel(s))"
                    )
                cases[case] = [chans[c] for c in want]
            self._images[folder] = cases
        if not self._images["imagesTr"]:
            raise DataError(f"{os.path.join(self.root, 'imagesTr')}: no images named <case>_0000{self.ending} "
                            f"(or <case>{self.ending} for one channel)")

    def _label_path(self, name) -> Optional[str]:
        for folder in ("labelsTr", "labelsTs"):
            p = os.path.join(self.root, folder, name + self.ending)
            if os.path.isfile(p):
                return p
        return None

    def labeled_cases(self) -> List[str]:
        return [c for c in sorted(self._images["imagesTr"]) if self._label_path(c)]

    def has_split(self, split):
        if _list_path(self.root, f"{split}.list"):
            return True
        if split == "train":
            return True
        if split == "test":
            self._warn_unlabeled_test()
            return bool(self._images["imagesTs"]) and os.path.isdir(os.path.join(self.root, "labelsTs"))
        return False

    def _warn_unlabeled_test(self):
        """imagesTs cases without a label cannot be scored: say which (once), never drop them silently."""
        if self._warned_test or not self._images["imagesTs"]:
            return
        self._warned_test = True
        ts = sorted(self._images["imagesTs"])
        if not os.path.isdir(os.path.join(self.root, "labelsTs")):
            warnings.warn(f"{os.path.join(self.root, 'imagesTs')}: {len(ts)} case(s) but no labelsTs/ folder; "
                          f"they are not used for testing (a test split is drawn from the training cases)")
            return
        lost = [c for c in ts if not os.path.isfile(os.path.join(self.root, "labelsTs", c + self.ending))]
        if lost:
            more = f" and {len(lost) - 5} more" if len(lost) > 5 else ""
            warnings.warn(f"{os.path.join(self.root, 'labelsTs')}: {len(lost)} of {len(ts)} imagesTs case(s) have "
                          f"no label and are left out of the test metrics: {', '.join(lost[:5])}{more}")

    def cases(self, split):
        p = _list_path(self.root, f"{split}.list")
        if p:
            return read_list(p)
        if split == "train":
            return sorted(self._images["imagesTr"])
        if split == "test" and self.has_split("test"):
            return [c for c in sorted(self._images["imagesTs"]) if self._label_path(c)]
        raise DataError(f"{self.root}: no '{split}' split (no {split}.list)")

    def case_path(self, name):
        for folder in ("imagesTr", "imagesTs"):
            if name in self._images[folder]:
                return self._images[folder][name][0]
        raise DataError(f"{self.root}: case {name!r} not found in imagesTr/ or imagesTs/")

    def _channel_paths(self, name):
        for folder in ("imagesTr", "imagesTs"):
            if name in self._images[folder]:
                return self._images[folder][name]
        raise DataError(f"{self.root}: case {name!r} not found in imagesTr/ or imagesTs/")

    def load_case(self, name, need_label=True):
        """The model-space image with the original-grid label; from the cache when
        :meth:`prepare` wrote it for evaluation (no affine/header then), else from the files."""
        meta_path = self._cached(name)[0][: -len("_img.npy")] + "_meta.json"
        if self.cache_dir is not None and os.path.isfile(meta_path):
            try:
                with open(meta_path) as f:
                    meta = json.load(f)
                image = np.load(self._cached(name)[0])
                orig = meta_path[: -len("_meta.json")] + "_orig.npy"
                label = np.load(orig).astype(np.int64) if os.path.isfile(orig) else None
            except (OSError, ValueError) as exc:
                raise DataError(f"{meta_path}: cannot read cached case ({exc}); delete the cache folder") from exc
            if label is not None or not need_label:
                return Case(name=name, image=image, label=label, spacing=tuple(meta["spacing"]),
                            path=meta["path"], meta={"original_shape": tuple(meta["original_shape"])})
        paths = self._channel_paths(name)
        lp = self._label_path(name)
        if need_label and lp is None:
            raise DataError(f"{os.path.join(self.root, 'labelsTr', name + self.ending)}: label file not found")
        return load_nifti_case(paths, lp, self.preprocessing(), self.num_classes, name=name)

    # -- cache ---------------------------------------------------------------
    def _cache_root(self) -> str:
        spec = json.dumps(self.preprocessing(), sort_keys=True)
        key = hashlib.sha1(spec.encode()).hexdigest()[:10]
        base = self.cache_dir or os.path.join(self.root, ".icl_cache")
        return os.path.join(base, f"nifti_{key}")

    def _cached(self, name) -> Tuple[str, str]:
        d = self._cache_root()
        return os.path.join(d, f"{name}_img.npy"), os.path.join(d, f"{name}_seg.npy")

    def prepare(self, names: Optional[Sequence[str]] = None, progress: bool = True, for_eval: bool = False) -> None:
        """Write preprocessed arrays to the cache (skipping those present): the model-space
        image and label for training; with ``for_eval`` also the original-grid label and geometry."""
        from tqdm import tqdm

        names = list(names) if names is not None else self.cases("train")

        def done(n):
            ip = self._cached(n)[0]
            return os.path.isfile(ip) and (not for_eval or os.path.isfile(ip[: -len("_img.npy")] + "_meta.json"))

        todo = [n for n in names if not done(n)]
        if not todo:
            return
        os.makedirs(self._cache_root(), exist_ok=True)
        ldt = np.int16 if self.num_classes is None or self.num_classes < 32000 else np.int32
        for n in tqdm(todo, desc="preprocessing NIfTI", disable=not progress, leave=False):
            paths = self._channel_paths(n)
            case = load_nifti_case(paths, self._label_path(n), self.preprocessing(), self.num_classes, name=n)
            label = case.meta.get("label_resampled")
            ip, sp = self._cached(n)
            if label is not None:
                _atomic_npy(sp, label.astype(ldt))
            _atomic_npy(ip, case.image)
            if for_eval:
                base = ip[: -len("_img.npy")]
                if case.label is not None:
                    _atomic_npy(base + "_orig.npy", case.label.astype(ldt))
                meta = {"spacing": list(case.spacing), "original_shape": list(case.meta["original_shape"]),
                        "path": case.path}
                with open(base + "_meta.json.tmp", "w") as f:
                    json.dump(meta, f)
                os.replace(base + "_meta.json.tmp", base + "_meta.json")

    def train_items(self, spatial_dims):
        names = self.cases("train")
        self.prepare(names)
        items = []
        for n in names:
            ip, sp = self._cached(n)
            labeled = os.path.isfile(sp)
            if spatial_dims == 3:
                items.append(Item(n, ip, labeled=labeled))
            else:
                shape = np.load(ip, mmap_mode="r").shape
                items.extend(Item(n, ip, i, self.slice_axis, labeled) for i in range(shape[1 + self.slice_axis]))
        # labeled cases first so that "the first N cases" are labeled ones
        return [it for it in items if it.labeled] + [it for it in items if not it.labeled]

    def load_item(self, item):
        ip, sp = item.path, item.path[: -len("_img.npy")] + "_seg.npy"
        try:
            img = np.load(ip, mmap_mode="r")
            seg = np.load(sp, mmap_mode="r") if item.labeled else None
        except (OSError, ValueError) as exc:
            raise DataError(f"{ip}: cannot read cached array ({exc}); delete the cache folder to rebuild it") from exc
        if item.index is not None:
            img = np.take(img, item.index, axis=1 + item.axis)
            seg = None if seg is None else np.take(seg, item.index, axis=item.axis)
        img = np.array(img, dtype=np.float32)
        seg = None if seg is None else np.array(seg, dtype=np.int64)
        where = "" if item.index is None else f" slice {item.index} along axis {item.axis}"
        check_finite(img, f"{ip} (case {item.case})", where)
        return img, seg

    def preprocessing(self):
        return {"layout": "nifti", "slice_axis": self.slice_axis, "normalization": list(self.schemes),
                "ct_window": list(self.ct_window),
                "target_spacing": list(self.target_spacing) if self.target_spacing else None,
                "file_ending": self.ending}


def _check_dataset_json(info, js: str) -> Tuple[str, List[str]]:
    """(file ending, channel names in order) of a parsed dataset.json; refuses what nnU-Net would not read."""
    if not isinstance(info, dict):
        raise DataError(f"{js}: expected a JSON object with channel_names, labels and file_ending; "
                        f"found a {type(info).__name__}")
    ending = info.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.startswith(".") or ending not in (".nii.gz", ".nii"):
        raise DataError(f"{js}: file_ending {ending!r}: expected \".nii.gz\" or \".nii\"")
    key = "channel_names" if "channel_names" in info else "modality"
    names = info.get(key) or {"0": "MR"}
    if not isinstance(names, dict):
        raise DataError(f"{js}: {key} must map channel numbers to names, e.g. {{\"0\": \"CT\"}}; "
                        f"found a {type(names).__name__}")
    try:
        nums = {int(str(k)): v for k, v in names.items()}
    except ValueError:
        raise DataError(f"{js}: {key} keys {sorted(map(str, names))} must be channel numbers 0, 1, ...") from None
    if sorted(nums) != list(range(len(nums))):
        raise DataError(f"{js}: {key} numbers {sorted(nums)} must be 0 .. {len(nums) - 1} without gaps")
    if not all(isinstance(v, str) for v in nums.values()):
        raise DataError(f"{js}: {key} values must be names such as \"CT\" or \"T2\"")
    labels = info.get("labels")
    if labels is not None and not isinstance(labels, (dict, list)):
        raise DataError(f"{js}: labels must map names to class numbers; found a {type(labels).__name__}")
    return ending, [nums[k] for k in range(len(nums))]


# Geometry must agree within these tolerances: voxel sizes relative, origins in mm,
# directions absolute (header floats are float32; resampled files carry rounding noise).
_SPACING_RTOL = 1e-3
_ORIGIN_ATOL = 1e-2
_DIRECTION_ATOL = 1e-3


def _geometry_mismatch(aff_a: np.ndarray, aff_b: np.ndarray, zooms_a=None, zooms_b=None) -> Optional[str]:
    """None when two affines (and header voxel sizes, when given) describe the same grid
    within tolerance, else what differs."""
    if zooms_a is not None and zooms_b is not None and \
            not np.allclose(zooms_a[:3], zooms_b[:3], rtol=_SPACING_RTOL, atol=0):
        return f"voxel spacing {tuple(round(float(z), 4) for z in zooms_b[:3])} vs " \
               f"{tuple(round(float(z), 4) for z in zooms_a[:3])}"
    za, zb = np.linalg.norm(aff_a[:3, :3], axis=0), np.linalg.norm(aff_b[:3, :3], axis=0)
    if not np.allclose(za, zb, rtol=_SPACING_RTOL, atol=0):
        return f"voxel spacing {tuple(np.round(zb, 4).tolist())} vs {tuple(np.round(za, 4).tolist())}"
    if not np.allclose(aff_a[:3, 3], aff_b[:3, 3], rtol=0, atol=_ORIGIN_ATOL):
        return f"origin {tuple(np.round(aff_b[:3, 3], 3).tolist())} vs {tuple(np.round(aff_a[:3, 3], 3).tolist())}"
    da, db = aff_a[:3, :3] / np.maximum(za, 1e-12), aff_b[:3, :3] / np.maximum(zb, 1e-12)
    if not np.allclose(da, db, rtol=0, atol=_DIRECTION_ATOL):
        return "axis directions (orientation) differ"
    return None


def _atomic_npy(path, arr):
    tmp = path + ".tmp.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


def load_nifti_case(paths: Sequence[str], label_path: Optional[str], prep: Dict,
                    num_classes: Optional[int] = None, name: Optional[str] = None) -> Case:
    """Read channel files (+ label), normalise and resample as ``prep`` says.

    The returned case holds the model-space image; ``label`` is the label on the
    original grid (for metrics), ``meta['label_resampled']`` the label on the model grid.
    """
    chans, affine, zooms, header, shape = [], None, None, None, None
    for p in paths:
        data, aff, zz, hdr = read_nifti(p)
        if data.ndim != 3:
            raise DataError(f"{p}: NIfTI image has {data.ndim} axes; expected 3 (one file per channel)")
        if shape is None:
            shape, affine, zooms, header = data.shape, aff, zz, hdr
        else:
            if data.shape != shape:
                raise DataError(f"{p}: shape {data.shape} differs from {paths[0]} {shape}")
            diff = _geometry_mismatch(affine, aff, zooms, zz)
            if diff:
                raise DataError(f"{p}: geometry differs from channel 0 {paths[0]}: {diff}; resample the channels "
                                f"onto one grid")
        chans.append(check_finite(np.asarray(data, dtype=np.float32), p))
    image = np.stack(chans)
    schemes = prep.get("normalization") or ["none"] * image.shape[0]
    if len(schemes) != image.shape[0]:
        raise DataError(f"{paths[0]}: {image.shape[0]} channel(s) but the preprocessing names {len(schemes)}")
    image = pp.normalize(image, schemes, prep.get("ct_window", pp.DEFAULT_CT_WINDOW))
    label = None
    if label_path is not None:
        data, laff, lzooms, _ = read_nifti(label_path)
        from .io import _check_label

        label = _check_label(np.asarray(data), label_path, num_classes)
        if label.shape != tuple(shape):
            raise DataError(f"{label_path}: label shape {label.shape} differs from image shape {tuple(shape)}")
        diff = _geometry_mismatch(affine, laff, zooms, lzooms)
        if diff:
            raise DataError(f"{label_path}: label geometry differs from image {paths[0]}: {diff}; the label "
                            f"must lie on the image's grid")
    target = prep.get("target_spacing")
    meta = {"original_shape": tuple(int(s) for s in shape), "header": header, "label_resampled": label}
    spacing = tuple(float(z) for z in zooms)
    if target:
        new_shape = pp.target_shape(shape, zooms, target)
        image = pp.resample_image(image, new_shape)
        if label is not None:
            meta["label_resampled"] = pp.resample_label(label, new_shape)
    if name is None:
        name = os.path.basename(paths[0])
        for ext in (".nii.gz", ".nii"):
            if name.endswith(ext):
                name = name[: -len(ext)]
        name = re.sub(r"_\d{4}$", "", name)
    return Case(name=name, image=image, label=label, spacing=spacing, affine=affine,
                path=paths[0], meta=meta)


def detect_layout(root: str) -> Optional[str]:
    if os.path.isfile(os.path.join(root, "dataset.json")):
        return "nifti"
    if os.path.isdir(os.path.join(root, LASource.FOLDER)):
        return "la"
    if os.path.isdir(os.path.join(root, "data", "slices")) or os.path.isfile(os.path.join(root, "train_slices.list")):
        return "acdc"
    if os.path.isfile(os.path.join(root, "train.txt")):
        return "brats2019"
    return None


def build_source(dataset: str, root: str, num_classes: Optional[int] = None, **options) -> Source:
    """The source for ``dataset`` (one of DATASETS) at ``root``.

    ``synthetic`` detects the layout of a folder written by :func:`make_synthetic`.
    """
    if dataset not in DATASETS:
        raise DataError(f"--dataset {dataset!r}: unknown data set; expected one of {', '.join(DATASETS)}")
    if not os.path.isdir(root):
        raise DataError(f"--root {root}: directory not found")
    synthetic = dataset == "synthetic"
    if synthetic:
        dataset = detect_layout(root)
        if dataset is None:
            raise DataError(f"--root {root}: no synthetic data set found (write one with icl.data.make_synthetic)")
    nifti_keys = ("normalization", "target_spacing", "ct_window", "cache_dir")
    if dataset != "nifti":
        for k in nifti_keys:
            options.pop(k, None)
    if dataset == "acdc":
        return ACDCSource(root, num_classes, use_table=not synthetic, **options)
    if dataset == "la":
        return LASource(root, num_classes, **options)
    if dataset == "brats2019":
        return BraTSSource(root, num_classes, **options)
    return NiftiSource(root, num_classes, **options)
