"""Plots of a training run: loss and Dice curves, qualitative overlays (matplotlib, Agg)."""
from __future__ import annotations

import csv
import os
from typing import Dict, List, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _smooth(v: np.ndarray, n: int) -> np.ndarray:
    if n <= 1 or v.size < n:
        return v
    k = np.ones(n) / n
    head = np.cumsum(v[: n - 1]) / np.arange(1, n)
    return np.concatenate([head, np.convolve(v, k, mode="valid")])


def training_curves(log_csv: str, val_history: Sequence[Dict], out_dir: str) -> List[str]:
    """``loss.png`` (each loss term per iteration, smoothed) and ``dice.png`` (validation mean and per-class Dice)."""
    plt = _plt()
    os.makedirs(out_dir, exist_ok=True)
    written = []
    rows = []
    if os.path.isfile(log_csv):
        with open(log_csv) as f:
            rows = list(csv.DictReader(f))
    if rows:
        it = np.array([float(r["iteration"]) for r in rows])
        fig, ax = plt.subplots(figsize=(7, 4))
        n = max(1, len(rows) // 100)
        for k in ("total", "supervised", "auxiliary", "pseudo", "consistency"):
            vals = [r.get(k, "") for r in rows]
            if all(v not in ("", None) for v in vals):
                ax.plot(it, _smooth(np.array(vals, dtype=float), n), label=k)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = os.path.join(out_dir, "loss.png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
    if val_history:
        fig, ax = plt.subplots(figsize=(7, 4))
        its = [v["iteration"] for v in val_history]
        ax.plot(its, [v["mean_dice"] for v in val_history], "k-o", label="mean", markersize=3)
        classes = sorted({c for v in val_history for c in v.get("per_class", {})}, key=lambda s: int(s))
        for c in classes:
            ax.plot(its, [v["per_class"].get(c, np.nan) for v in val_history], "--", label=f"class {c}", alpha=0.7)
        ax.set_xlabel("iteration")
        ax.set_ylabel("validation Dice")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = os.path.join(out_dir, "dice.png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
    return written


def overlay(case, pred: np.ndarray, path: str, slice_axis: int = 0) -> str:
    """Image, label and prediction of the slice with the most foreground (3D) or the image (2D)."""
    plt = _plt()
    img = case.image[0]
    lab = case.label if case.label is not None else np.zeros_like(pred)
    if img.shape != pred.shape:  # resampled data: show the prediction's own grid
        from .data import preprocess as pp

        img = pp.resample_image(case.image[:1], pred.shape)[0]
        lab = case.label if case.label is not None and case.label.shape == pred.shape else np.zeros_like(pred)
    if img.ndim == 3:
        fg = (lab > 0).sum(axis=tuple(a for a in range(3) if a != slice_axis))
        i = int(np.argmax(fg)) if fg.max() > 0 else img.shape[slice_axis] // 2
        img, lab, pred = (np.take(a, i, axis=slice_axis) for a in (img, lab, pred))
    k = int(max(lab.max(), pred.max(), 1))
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    for ax, (title, m) in zip(axes, [("image", None), ("label", lab), ("prediction", pred)]):
        ax.imshow(img, cmap="gray")
        if m is not None:
            ax.imshow(np.ma.masked_where(m == 0, m), cmap="tab10", vmin=0, vmax=max(k, 9), alpha=0.5,
                      interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(case.name)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
