"""Reading and writing the files of the supported layouts.

Every failure raises :class:`DataError` with the path of the file and what was
expected, so that a bad case in a data set of hundreds is found at once.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import UsageError


class DataError(UsageError):
    """A data file or list is missing, unreadable or holds unexpected content."""


@dataclass
class Case:
    """One volume (or image) with its label and geometry.

    image: float32 [C, *spatial]; label: integer [*spatial] or None.
    spacing: voxel size per spatial axis (None: unknown, metrics in voxels).
    affine: 4x4 voxel-to-world matrix of a NIfTI source (None for h5).
    meta: what is needed to write a prediction back in the source geometry.
    """

    name: str
    image: np.ndarray
    label: Optional[np.ndarray] = None
    spacing: Optional[Tuple[float, ...]] = None
    affine: Optional[np.ndarray] = None
    path: str = ""
    meta: Dict = field(default_factory=dict)


def read_list(path: str) -> List[str]:
    """Case names of a ``.list`` / ``.txt`` file, one per line (text after a comma is ignored)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: list file not found")
    names = []
    try:
        with open(path, "r", encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file (expected one case name per line)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read list file ({exc.strerror or exc})") from None
    for number, line in enumerate(lines, 1):
        name = line.strip().split(",")[0].strip()
        for ext in (".nii.gz", ".nii", ".h5"):  # lists that name files (e.g. AMOS) -> case names
            if name.endswith(ext):
                name = name[: -len(ext)]
        if name and _leaves_its_folder(name):
            raise DataError(f"{path}: line {number} names {name!r}, which points outside the data set; an entry "
                            f"names a case inside --root (no absolute paths, no '..' out of its folder)")
        if name:
            names.append(name)
    if not names:
        raise DataError(f"{path}: list file is empty")
    return names


def _leaves_its_folder(name: str) -> bool:
    """An absolute path, or a relative one that climbs out of the folder it is joined to (a
    symbolic link inside the data set is the user's own and is followed as usual)."""
    if os.path.isabs(name):
        return True
    norm = os.path.normpath(name)
    return norm == ".." or norm.startswith(".." + os.sep)


def check_finite(image: np.ndarray, path: str, where: str = "") -> np.ndarray:
    """Refuse an image holding NaN or infinite values (they would silently turn every
    prediction into background, or every loss into NaN). ``where`` says which part was read."""
    if image.dtype.kind in "fc" and image.size:
        finite = np.isfinite(image)
        if not finite.all():
            bad = int(image.size - np.count_nonzero(finite))
            kinds = []
            if np.isnan(image).any():
                kinds.append("NaN")
            if np.isinf(image).any():
                kinds.append("infinite")
            raise DataError(f"{path}: 'image'{where} holds {bad} {' and '.join(kinds)} value(s); "
                            f"fix or remove this case")
    return image


def _check_label(label: np.ndarray, path: str, num_classes: Optional[int]) -> np.ndarray:
    if label.dtype.kind == "f":
        rounded = np.rint(label)
        if not np.array_equal(rounded, label):
            raise DataError(f"{path}: 'label' holds non-integer values; expected class indices")
        label = rounded
    elif label.dtype.kind not in "iub":
        raise DataError(f"{path}: 'label' has dtype {label.dtype}; expected an integer type")
    label = label.astype(np.int64, copy=False)
    if label.size:
        lo, hi = int(label.min()), int(label.max())
        if lo < 0:
            raise DataError(f"{path}: 'label' holds the negative value {lo}; expected 0..{(num_classes or 1) - 1}")
        if num_classes is not None and hi >= num_classes:
            raise DataError(
                f"{path}: 'label' holds the value {hi} but num_classes is {num_classes} "
                f"(labels must be < num_classes)"
            )
    return label


def _channels_first(image: np.ndarray, spatial_dims: int, path: str) -> np.ndarray:
    if image.ndim == spatial_dims:
        image = image[None]
    elif image.ndim != spatial_dims + 1:
        raise DataError(
            f"{path}: 'image' has shape {tuple(image.shape)}; expected {spatial_dims} spatial axes "
            f"(optionally with a leading channel axis)"
        )
    return np.ascontiguousarray(image, dtype=np.float32)


@functools.lru_cache(maxsize=1)
def _memory_bytes() -> int:
    """Physical memory (read once: every h5 read of training checks against it)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 64 << 30


def check_declared_size(path: str, name: str, shape: Sequence[int], itemsize: int, what: str = "") -> None:
    """Refuse to read a dataset whose declared shape needs more than half this machine's memory
    (as read, and as float32): a corrupt or hostile header, not a case (one 3D volume of
    512^3 float32 voxels is 0.5 GiB)."""
    n = 1
    for d in shape:
        n *= int(d)
    need = n * max(int(itemsize), 4)
    limit = _memory_bytes() // 2
    if need > limit:
        raise DataError(f"{path}: dataset {name!r} declares shape {tuple(int(d) for d in shape)}{what} "
                        f"({need / 2 ** 30:.1f} GiB to read), more than half of this machine's memory "
                        f"({limit * 2 / 2 ** 30:.1f} GiB); the file is corrupt or not a case")


def read_h5(
    path: str,
    spatial_dims: int,
    num_classes: Optional[int] = None,
    need_label: bool = True,
    index: Optional[Tuple[int, int]] = None,
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Read ``image`` [C, *spatial] float32 and ``label`` [*spatial] int64 from an h5 file.

    index=(axis, i): read only slice i along spatial axis ``axis`` (2D training
    from 3D volumes); spatial_dims is then the dimension of the file's volume.
    """
    import h5py

    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise DataError(f"{path}: no 'image' dataset (keys: {sorted(f.keys())})")
            if need_label and "label" not in f:
                raise DataError(f"{path}: no 'label' dataset (keys: {sorted(f.keys())})")
            dimg = f["image"]
            for key in ("image", "label"):
                if key in f and hasattr(f[key], "shape"):
                    d = f[key]
                    shape = list(d.shape)
                    if index is not None and d.ndim:  # one slice along the volume's axis
                        shape[(d.ndim - spatial_dims if key == "image" else 0) + index[0]] = 1
                    check_declared_size(path, key, shape, d.dtype.itemsize)
            if index is None:
                image = dimg[()]
                label = f["label"][()] if (need_label or "label" in f) and "label" in f else None
            else:
                axis, i = index
                off = dimg.ndim - spatial_dims
                sel = [slice(None)] * dimg.ndim
                sel[off + axis] = i
                image = dimg[tuple(sel)]
                label = None
                if "label" in f:
                    dl = f["label"]
                    lsel = [slice(None)] * dl.ndim
                    lsel[axis] = i
                    label = dl[tuple(lsel)]
                spatial_dims -= 1
    except DataError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: cannot read h5 file ({exc})") from exc
    check_finite(np.asarray(image), path, "" if index is None else f" slice {index[1]} along axis {index[0]}")
    image = _channels_first(np.asarray(image), spatial_dims, path)
    if label is not None:
        label = _check_label(np.asarray(label), path, num_classes)
        if tuple(label.shape) != tuple(image.shape[1:]):
            raise DataError(
                f"{path}: 'label' shape {tuple(label.shape)} differs from 'image' spatial shape {tuple(image.shape[1:])}"
            )
    return image, label


def h5_image_info(path: str) -> Tuple[Optional[int], Dict]:
    """(number of axes of 'image' or None, the file's attributes), read safely."""
    import h5py

    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise DataError(f"{path}: no 'image' dataset (keys: {sorted(f.keys())})")
            check_declared_size(path, "image", f["image"].shape, f["image"].dtype.itemsize)
            return f["image"].ndim, dict(f.attrs)
    except DataError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: cannot read h5 file ({exc})") from exc


def h5_shape(path: str) -> Tuple[int, ...]:
    """Spatial shape of the 'label' (or 'image') dataset without reading it."""
    import h5py

    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with h5py.File(path, "r") as f:
            key = "label" if "label" in f else "image"
            if key not in f:
                raise DataError(f"{path}: no 'image' dataset")
            return tuple(f[key].shape)
    except DataError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: cannot read h5 file ({exc})") from exc


def write_h5(path: str, image: Optional[np.ndarray] = None, label: Optional[np.ndarray] = None, **extra) -> None:
    import h5py

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as f:
        if image is not None:
            f.create_dataset("image", data=np.asarray(image, dtype=np.float32), compression="gzip")
        if label is not None:
            f.create_dataset("label", data=np.asarray(label), compression="gzip")
        for k, v in extra.items():
            f.attrs[k] = v
    os.replace(tmp, path)


def read_nifti(path: str):
    """(data, affine, zooms, header) of a NIfTI file; data as stored (float or int)."""
    import nibabel as nib

    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(path)
        check_declared_size(path, "image", img.shape, np.dtype(img.get_data_dtype()).itemsize, " in its header")
        data = np.asarray(img.dataobj)
        zooms = tuple(float(z) for z in img.header.get_zooms()[: data.ndim])
        return data, np.asarray(img.affine, dtype=np.float64), zooms, img.header
    except DataError:
        raise
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise DataError(f"{path}: cannot read NIfTI file ({str(exc) or type(exc).__name__})") from exc


def write_nifti(path: str, data: np.ndarray, affine: np.ndarray, header=None) -> None:
    import nibabel as nib

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(data, affine, header=hdr)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if hdr is not None:
        img.header.set_zooms(header.get_zooms()[: data.ndim])
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    base = os.path.basename(path)
    ext = ".nii.gz" if base.endswith(".nii.gz") else ".nii"
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), ".tmp_" + base[: -len(ext)] + ext)
    nib.save(img, tmp)
    os.replace(tmp, path)
