"""The MNI ICBM152 2009a template the demo population is drawn from (bundled in the
``nilearn`` wheel: no download), and the build cache check the demo's data shares."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import numpy as np

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

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


def cached_meta(root: str, params: Dict) -> Optional[Dict]:
    """``<root>/meta.json`` when it records exactly ``params`` (a data set built
    with the same settings), else None."""
    meta_path = os.path.join(root, "meta.json")
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path) as fh:
        meta = json.load(fh)
    return meta if meta.get("params") == params else None
