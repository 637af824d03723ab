"""How a prediction on a resampled grid returns to the source grid: labels by nearest
neighbour (the old path) against class probabilities resampled linearly, then the argmax.

Run from a checkout:  python -m benches.resampling [--quick] [--csv FILE] [--txt FILE]

Synthetic volumes at anisotropic or fine spacings hold two disjoint ellipsoids
(classes 1 and 2) defined in millimetres. Each volume is resampled to a target
spacing the way ``--target-spacing`` does (``icl.data.preprocess``: voxel edges
aligned), and an oracle predicts on that model grid:
- ``labels``: the exact ground truth sampled at the model grid's voxel centres,
  as one-hot probabilities (a perfect model);
- ``soft``: calibrated probabilities, softmax of (0, -d1/t, -d2/t) with d_k the
  (approximate) signed distance in mm to ellipsoid k and t half a model voxel.
Both go back to the source grid by each path (nearest labels: ``pp.resample_label``;
probabilities: ``icl.inference.argmax_resampled``) and are scored against the
exact source-grid ground truth: Dice and HD95 (mm) per class (``icl.metrics``).
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import time

import numpy as np
import torch

from icl import metrics as M
from icl.data import preprocess as pp
from icl.inference import argmax_resampled

#: (name, source spacing mm, source shape, target spacing mm)
CASES = [
    ("aniso-0.8x0.8x3-to-1.5", (0.8, 0.8, 3.0), (128, 128, 32), (1.5, 1.5, 1.5)),
    ("iso-0.7-to-2", (0.7, 0.7, 0.7), (128, 128, 96), (2.0, 2.0, 2.0)),
    ("aniso-1x1x5-to-1", (1.0, 1.0, 5.0), (112, 112, 20), (1.0, 1.0, 1.0)),
]
QUICK = [("aniso-0.8x0.8x3-to-1.5", (0.8, 0.8, 3.0), (64, 64, 16), (1.5, 1.5, 1.5))]


def _centres(shape, spacing):
    """Voxel centres in mm with voxel edges at 0 (the grid convention of pp.resample_image)."""
    axes = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]
    return np.meshgrid(*axes, indexing="ij")


def _signed_distances(shape, spacing, extent):
    """Approximate signed distances (mm, negative inside) to the two ellipsoids."""
    x, y, z = _centres(shape, spacing)
    ex = np.asarray(extent)
    out = []
    for c, r in (((0.38, 0.5, 0.5), (0.24, 0.3, 0.32)), ((0.74, 0.46, 0.55), (0.13, 0.17, 0.22))):
        cc, rr = ex * np.asarray(c), ex * np.asarray(r)
        q = np.sqrt(((x - cc[0]) / rr[0]) ** 2 + ((y - cc[1]) / rr[1]) ** 2 + ((z - cc[2]) / rr[2]) ** 2)
        out.append((q - 1.0) * rr.min())
    return out


def _labels(d):
    lab = np.zeros(d[0].shape, np.int64)
    lab[d[0] < 0] = 1
    lab[d[1] < 0] = 2
    return lab


def run(cases):
    rows = []
    for name, spacing, shape, target in cases:
        extent = [n * s for n, s in zip(shape, spacing)]
        gt = _labels(_signed_distances(shape, spacing, extent))
        mshape = pp.target_shape(shape, spacing, target)
        mspacing = [e / n for e, n in zip(extent, mshape)]
        dm = _signed_distances(mshape, mspacing, extent)
        onehot = np.eye(3, dtype=np.float32)[_labels(dm)].transpose(3, 0, 1, 2)
        t = 0.5 * min(mspacing)
        logits = np.stack([np.zeros_like(dm[0]), -dm[0] / t, -dm[1] / t])
        soft = torch.softmax(torch.from_numpy(logits).float(), 0).numpy()
        for oracle, probs in (("labels", onehot), ("soft", soft)):
            for path in ("nearest-labels", "probabilities"):
                t0 = time.perf_counter()
                if path == "nearest-labels":
                    pred = pp.resample_label(probs.argmax(0), shape)
                else:
                    pred = argmax_resampled(torch.from_numpy(probs), shape).numpy()
                sec = time.perf_counter() - t0
                res = M.evaluate_case(pred, gt, 3, spacing=spacing)
                for c in (1, 2):
                    rows.append({"case": name, "model_grid": "x".join(map(str, mshape)), "oracle": oracle,
                                 "path": path, "class": c, "dice": res[c]["dice"], "hd95_mm": res[c]["hd95"],
                                 "restore_s": sec})
    return rows


def _machine() -> str:
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} thread(s)"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one small volume (seconds)")
    p.add_argument("--csv", help="write the rows to this CSV file")
    p.add_argument("--txt", help="write the table to this text file")
    args = p.parse_args(argv)
    rows = run(QUICK if args.quick else CASES)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    lines = [f"$ python -m benches.resampling{' --quick' if args.quick else ''}   (commit {commit}; {_machine()})",
             f"{'case':<24} {'model grid':<11} {'oracle':<7} {'path':<15} {'class':>5} {'dice':>8} {'hd95 mm':>8}"]
    for r in rows:
        lines.append(f"{r['case']:<24} {r['model_grid']:<11} {r['oracle']:<7} {r['path']:<15} {r['class']:>5} "
                     f"{r['dice']:>8.4f} {r['hd95_mm']:>8.3f}")
    lines.append("mean over classes and cases:")
    for oracle in ("labels", "soft"):
        for path in ("nearest-labels", "probabilities"):
            sel = [r for r in rows if r["oracle"] == oracle and r["path"] == path]
            lines.append(f"  {oracle:<7} {path:<15} dice {np.mean([r['dice'] for r in sel]):.4f}  "
                         f"hd95 {np.mean([r['hd95_mm'] for r in sel]):.3f} mm")
    text = "\n".join(lines)
    print(text)
    if args.txt:
        with open(args.txt, "w") as f:
            f.write(text + "\n")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


if __name__ == "__main__":
    main()
