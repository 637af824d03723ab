"""Evaluation of a segmentation network on the cases of a split.

Per case: predict (``icl.inference.predict``), map the prediction back to the
case's original grid when the data was resampled (class probabilities
resampled linearly, then the argmax), and compute Dice, Jaccard,
HD95 and ASD per foreground class (``icl.metrics``; HD95/ASD in mm when the
data has a spacing, voxels otherwise). Results: a per-case CSV and a summary JSON.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Dict, Sequence

import numpy as np

from . import metrics as M
from .data import preprocess as pp
from .data.io import Case
from .inference import predict


def restore_geometry(pred: np.ndarray, case: Case) -> np.ndarray:
    """A label map on the model grid -> the case's original grid by nearest neighbour (the
    old path; ``evaluate_cases`` and ``icl predict`` resample probabilities instead)."""
    shape = case.meta.get("original_shape") if case.meta else None
    if shape is not None and tuple(pred.shape) != tuple(shape):
        return pp.resample_label(pred, shape)
    return pred


#: How a prediction on a resampled grid returns to the case's grid: class probabilities
#: resampled linearly, then the argmax (default); or the argmax, then nearest neighbour.
RESTORE_MODES = ("probabilities", "labels")


def evaluate_cases(
    model,
    source,
    names: Sequence[str],
    num_classes: int,
    patch_size: Sequence[int],
    overlap=0.5,
    batch_size: int = 8,
    device=None,
    amp: str = "none",
    progress: bool = True,
    desc: str = "evaluate",
    keep_predictions: int = 0,
    interpolation=None,
    restore: str = "probabilities",
    **predict_options,
) -> Dict:
    """Evaluate ``model`` (or a list of models: an ensemble) on the named cases of ``source``.

    ``interpolation``: how 2D models resize slices (see ``icl.predict``; None: the model's).
    ``restore``: one of RESTORE_MODES, for cases whose data was resampled.
    ``predict_options``: further ``icl.predict`` arguments (stride, weighting, blend,
    sw_batch_size, tta, ...).
    Returns {"cases": [(name, per-class dict)], "summary": metrics.summarize(...),
    "examples": [(case, prediction)] for the first ``keep_predictions`` cases}.
    """
    from tqdm import tqdm

    if restore not in RESTORE_MODES:
        raise ValueError(f"evaluate: restore must be one of {', '.join(RESTORE_MODES)}, got {restore!r}")
    results, examples = [], []
    for name in tqdm(list(names), desc=desc, disable=not progress, leave=False):
        case = source.load_case(name)
        shape = case.meta.get("original_shape") if case.meta else None
        pred = predict(model, case.image, patch_size=patch_size, slice_axis=source.slice_axis,
                       overlap=overlap, batch_size=batch_size, device=device, amp=amp,
                       interpolation=interpolation, output_shape=shape if restore == "probabilities" else None,
                       **predict_options)
        pred = restore_geometry(pred, case)
        per_class = M.evaluate_case(pred, case.label, num_classes, spacing=case.spacing)
        results.append((name, per_class))
        if len(examples) < keep_predictions:
            examples.append((case, pred))
    summary = M.summarize([r for _, r in results]) if results else {"mean": {}, "per_class": {}, "num_cases": 0}
    return {"cases": results, "summary": summary, "examples": examples}


def _clean(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, (np.floating,)):
        return _clean(float(v))
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return repr(v)  # e.g. a user's augmentation callable in a config


def json_ready(obj):
    """Keys as strings, NaN/inf as null, numpy scalars as Python numbers."""
    return _clean(obj)


def write_results(out_dir: str, result: Dict, prefix: str = "") -> Dict[str, str]:
    """``<prefix>cases.csv`` (one row per case and class, then per-case means) and ``<prefix>summary.json``."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{prefix}cases.csv")
    tmp = csv_path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "class"] + list(M.METRICS))
        for name, per_class in result["cases"]:
            for c, vals in per_class.items():
                w.writerow([name, c] + [f"{vals[m]:.6g}" for m in M.METRICS])
            means = {m: float(np.nanmean([vals[m] for vals in per_class.values()])) for m in M.METRICS} \
                if per_class else {m: float("nan") for m in M.METRICS}
            w.writerow([name, "mean"] + [f"{means[m]:.6g}" for m in M.METRICS])
    os.replace(tmp, csv_path)
    js_path = os.path.join(out_dir, f"{prefix}summary.json")
    with open(js_path + ".tmp", "w") as f:
        json.dump(json_ready(result["summary"]), f, indent=2)
    os.replace(js_path + ".tmp", js_path)
    return {"csv": csv_path, "json": js_path}
