"""`icl demo`: ICL against the supervised-only baseline on real MRI anatomy,
offline, on a laptop CPU.

Data: the brain-tissue set of :mod:`icl.demo.brain` (few labeled axial slices,
the other training slices unlabeled). Runs (same backbone, same labeled
slices, same iteration budget, same evaluation): ICL and the supervised-only
baseline, optionally the fully supervised upper bound (``--full``), for
``--seeds`` seeds. Scored per test volume on the clean test slabs and on a
fixed, seeded, corrupted copy of them (the headline), next to a two-threshold
intensity rule (the non-learning reference).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import brain, threshold

CLASSES = {1: "GM", 2: "WM"}


@dataclass
class DemoSettings:
    iterations: int
    batch_size: int
    labeled_bs: int
    val_every: int
    labeled_fraction: float
    seeds: int
    full: bool
    mixer: str = "conv"
    global_queries: str = "batch"

    @classmethod
    def preset(cls, quick: bool, gpu: bool) -> "DemoSettings":
        if quick:
            return cls(iterations=120, batch_size=8, labeled_bs=4, val_every=60, labeled_fraction=DEFAULT_FRACTION,
                       seeds=1, full=False)
        if gpu:
            return cls(iterations=6000, batch_size=16, labeled_bs=8, val_every=500, labeled_fraction=DEFAULT_FRACTION,
                       seeds=1, full=False)
        return cls(iterations=DEFAULT_ITERATIONS, batch_size=8, labeled_bs=4, val_every=200,
                   labeled_fraction=DEFAULT_FRACTION, seeds=1, full=False)


# Calibrated on 2 CPU cores (README "The demo"): see there for the measurements.
DEFAULT_FRACTION = 2 / 60   # two labeled axial slices out of 60 training slices
DEFAULT_ITERATIONS = 1000

INTENSITY_AUG = {"gamma": 0.5, "noise": 0.5, "bias": 0.5, "gamma_range": [0.6, 1.7], "noise_std": 0.05,
                 "bias_strength": 0.35}


def _train(root: str, out: str, method: str, fraction: float, s: DemoSettings, seed: int, device: Optional[str],
           backend: str, progress: bool):
    from icl.train import TrainConfig, train

    cfg = TrainConfig(dataset="acdc", root=root, num_classes=3, labeled_fraction=fraction, patch_size=[96, 96],
                      batch_size=s.batch_size, labeled_bs=s.labeled_bs, max_iterations=s.iterations,
                      val_every=s.val_every, save_every=0, out=out, method=method, mixer=s.mixer,
                      global_queries=s.global_queries, intensity_aug=INTENSITY_AUG, seed=seed, num_workers=0,
                      device=device, backend=backend, progress=progress, num_overlays=0,
                      overwrite=True)  # the demo owns its run folders: a rerun replaces them
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    return result, wall


def _evaluate(model, source, names: Sequence[str], device) -> Dict:
    from icl.evaluate import evaluate_cases

    res = evaluate_cases(model, source, names, 3, [96, 96], device=device, progress=False, keep_predictions=len(names))
    preds = {case.name: pred for case, pred in res["examples"]}
    return {"summary": res["summary"], "cases": res["cases"], "predictions": preds}


def _scores(summary: Dict) -> Dict[str, float]:
    out = {}
    for c, name in CLASSES.items():
        pc = summary["per_class"].get(c) or summary["per_class"].get(str(c))
        out[f"dice_{name}"] = float(pc["dice"])
        out[f"hd95_{name}"] = float(pc["hd95"])
    out["dice_mean"] = float(np.mean([out[f"dice_{n}"] for n in CLASSES.values()]))
    out["hd95_mean"] = float(np.mean([out[f"hd95_{n}"] for n in CLASSES.values()]))
    return out


def _threshold_reference(root: str) -> Dict:
    from icl.metrics import evaluate_case, summarize

    train = brain.load_train_slices(root)
    t = threshold.fit([x[1] for x in train], [x[2] for x in train])
    result = {"thresholds": list(t)}
    for split in ("test", "test_corrupted"):
        cases = brain.load_split(root, split)
        summary = summarize([evaluate_case(threshold.predict(img, t), lab, 3) for _, img, lab in cases])
        result[split] = _scores(summary)
        result.setdefault("predictions", {}).update({c: threshold.predict(img, t) for c, img, _ in cases})
    return result


def run_demo(out: str = "icl-demo", quick: bool = False, full: bool = False, seeds: Optional[int] = None,
             data_dir: Optional[str] = None, labeled_fraction: Optional[float] = None,
             iterations: Optional[int] = None, device: Optional[str] = None, backend: str = "auto",
             progress: bool = True, log=print) -> Dict:
    import torch

    gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    s = DemoSettings.preset(quick, gpu)
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {seeds}")
        s.seeds = seeds
    if labeled_fraction is not None:
        if not 0 < labeled_fraction <= 1:
            raise ValueError(f"--labeled-fraction must be in (0, 1], got {labeled_fraction}")
        s.labeled_fraction = labeled_fraction
    if iterations is not None:
        if iterations < 1:
            raise ValueError(f"--iterations must be >= 1, got {iterations}")
        s.iterations = iterations
        s.val_every = max(1, min(s.val_every, iterations))
    s.full = full
    os.makedirs(out, exist_ok=True)
    root = data_dir or os.path.join(out, "data")
    t_start = time.perf_counter()
    meta = brain.build(root, log=log)
    log(f"labeled: the first {max(1, round(s.labeled_fraction * meta['counts']['train_slices']))} of "
        f"{meta['counts']['train_slices']} training slices; {s.iterations} iterations per run, {s.seeds} seed(s)")
    ref = _threshold_reference(root)
    from icl.data import build_source

    source = build_source("acdc", root, 3)
    test_names = [c for c, *_ in brain.load_split(root, "test")]
    bad_names = [c for c, *_ in brain.load_split(root, "test_corrupted")]
    methods = [("supervised", "supervised", s.labeled_fraction), ("icl", "icl", s.labeled_fraction)]
    if s.full:
        methods.append(("full", "supervised", 1.0))
    runs: List[Dict] = []
    examples: Dict[str, Dict[str, np.ndarray]] = {}
    for seed in range(s.seeds):
        for label, method, fraction in methods:
            run_dir = os.path.join(out, "runs", f"{label}-seed{seed}")
            log(f"[{label}, seed {seed}] training ({method}, labeled fraction {fraction:.3f})")
            result, wall = _train(root, run_dir, method, fraction, s, seed, device, backend, progress)
            model = result.model.backbone if hasattr(result.model, "backbone") else result.model
            dev = next(model.parameters()).device
            clean = _evaluate(model, source, test_names, dev)
            bad = _evaluate(model, source, bad_names, dev)
            runs.append({"method": label, "seed": seed, "run_dir": os.path.relpath(run_dir, out),
                         "wall_s": round(wall, 1), "iterations": result.iteration,
                         "it_per_s": round(result.iteration / wall, 2),
                         "best": result.metrics.get("best"),
                         "test": _scores(clean["summary"]), "test_corrupted": _scores(bad["summary"])})
            if seed == 0:
                examples[label] = {**clean["predictions"], **bad["predictions"]}
            log(f"[{label}, seed {seed}] corrupted-test mean Dice {runs[-1]['test_corrupted']['dice_mean']:.4f}, "
                f"clean {runs[-1]['test']['dice_mean']:.4f} ({wall:.0f} s)")
    summary = _summarize(runs, ref)
    metrics = {"settings": vars(s), "data": {"root": os.path.abspath(root), "counts": meta["counts"]},
               "threshold_rule": {k: v for k, v in ref.items() if k != "predictions"},
               "runs": runs, "summary": summary, "wall_s": round(time.perf_counter() - t_start, 1),
               "device": str(device or ("cuda" if gpu else "cpu")), "torch_threads": torch.get_num_threads()}
    with open(os.path.join(out, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2)
    figures = _figures(out, runs, examples, ref["predictions"], root)
    report = _report(out, metrics, figures)
    log("\n" + _table(summary, "test_corrupted") + "\n")
    log(f"report: {report}")
    return metrics


def _summarize(runs: List[Dict], ref: Dict) -> Dict:
    out = {"threshold": {"test": ref["test"], "test_corrupted": ref["test_corrupted"], "n": 1}}
    for label in dict.fromkeys(r["method"] for r in runs):
        sel = [r for r in runs if r["method"] == label]
        entry = {"n": len(sel)}
        for split in ("test", "test_corrupted"):
            keys = sel[0][split].keys()
            entry[split] = {k: float(np.mean([r[split][k] for r in sel])) for k in keys}
            entry[split + "_std"] = {k: float(np.std([r[split][k] for r in sel])) for k in keys}
        entry["wall_s"] = float(np.mean([r["wall_s"] for r in sel]))
        entry["it_per_s"] = float(np.mean([r["it_per_s"] for r in sel]))
        out[label] = entry
    if "icl" in out and "supervised" in out:
        out["icl_minus_supervised_dice_points"] = {
            split: 100 * (out["icl"][split]["dice_mean"] - out["supervised"][split]["dice_mean"])
            for split in ("test", "test_corrupted")}
    return out


NAMES = {"threshold": "two-threshold rule", "supervised": "supervised only", "icl": "ICL", "full": "fully supervised"}


def _table(summary: Dict, split: str) -> str:
    head = f"{'method':<20} {'Dice GM':>8} {'Dice WM':>8} {'Dice mean':>10} {'HD95 GM':>8} {'HD95 WM':>8} {'HD95 mean':>10}"
    lines = [f"{'corrupted' if split == 'test_corrupted' else 'clean'} test slices (per-volume means)", head, "-" * len(head)]
    for key in ("threshold", "supervised", "icl", "full"):
        if key not in summary:
            continue
        v = summary[key][split]
        sd = summary[key].get(split + "_std")
        pm = f" ±{100 * sd['dice_mean']:.1f}" if sd and summary[key]["n"] > 1 else ""
        lines.append(f"{NAMES[key]:<20} {v['dice_GM']:>8.4f} {v['dice_WM']:>8.4f} {v['dice_mean']:>10.4f}"
                     f" {v['hd95_GM']:>8.2f} {v['hd95_WM']:>8.2f} {v['hd95_mean']:>10.2f}{pm}")
    return "\n".join(lines)


def _figures(out: str, runs: List[Dict], examples: Dict, threshold_preds: Dict, root: str) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import csv

    import matplotlib.pyplot as plt

    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    figures = {}
    # curves of seed 0: training loss (supervised term and total) and validation Dice
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        if r["seed"] != 0:
            continue
        log_path = os.path.join(out, r["run_dir"], "log.csv")
        if os.path.isfile(log_path):
            with open(log_path) as fh:
                rows = list(csv.DictReader(fh))
            it = np.array([float(x["iteration"]) for x in rows])
            for key, style in (("supervised", "-"), ("total", ":")):
                vals = np.array([float(x[key]) if x.get(key) not in (None, "") else np.nan for x in rows])
                if np.isfinite(vals).any() and not (key == "total" and r["method"] != "icl"):
                    k = max(1, len(vals) // 50)
                    smooth = np.convolve(np.nan_to_num(vals), np.ones(k) / k, mode="valid")
                    axes[0].plot(it[k - 1:], smooth, style, label=f"{NAMES[r['method']]} ({key})")
        metrics_path = os.path.join(out, r["run_dir"], "metrics.json")
        if os.path.isfile(metrics_path):
            with open(metrics_path) as fh:
                val = json.load(fh).get("val") or []
            if val:
                axes[1].plot([v["iteration"] for v in val], [v["mean_dice"] for v in val], marker="o",
                             label=NAMES[r["method"]])
    axes[0].set_xlabel("iteration"); axes[0].set_ylabel("loss"); axes[0].set_yscale("log"); axes[0].legend(fontsize=8)
    axes[0].set_title("training loss (moving average)")
    axes[1].set_xlabel("iteration"); axes[1].set_ylabel("mean Dice (GM, WM)"); axes[1].legend(fontsize=8)
    axes[1].set_title("validation Dice (clean validation slabs)")
    fig.tight_layout()
    figures["curves"] = os.path.join(fig_dir, "curves.png")
    fig.savefig(figures["curves"], dpi=100)
    plt.close(fig)
    # overlays: one slice of a corrupted and of a clean test volume
    cases = {c: (img, lab) for c, img, lab in brain.load_split(root, "test") + brain.load_split(root, "test_corrupted")}
    cols = [("image", None), ("ground truth", "gt"), ("ICL", "icl"), ("supervised only", "supervised"),
            ("two-threshold rule", "threshold")]
    clean_cases = [c for c in cases if not c.endswith("_corrupted")]
    middle = clean_cases[len(clean_cases) // 2]  # a mid-brain slab shows the most anatomy
    for tag, case in (("corrupted", middle + "_corrupted"), ("clean", middle)):
        img, lab = cases[case]
        z = int(np.argmax((lab > 0).reshape(lab.shape[0], -1).sum(1)))
        fig, axes = plt.subplots(1, len(cols), figsize=(3 * len(cols), 3.2))
        for ax, (title, key) in zip(axes, cols):
            ax.imshow(img[z], cmap="gray", vmin=0, vmax=1)
            if key is not None:
                seg = lab if key == "gt" else (threshold_preds[case] if key == "threshold" else examples.get(key, {}).get(case))
                if seg is not None:
                    ax.imshow(np.ma.masked_equal(seg[z], 0), cmap="autumn", alpha=0.45, vmin=1, vmax=2)
                else:
                    title += " (not run)"
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.suptitle(f"{tag} test slice ({case}, slice {z}): grey matter red, white matter yellow", fontsize=9)
        fig.tight_layout()
        figures[f"overlay_{tag}"] = os.path.join(fig_dir, f"overlay_{tag}.png")
        fig.savefig(figures[f"overlay_{tag}"], dpi=100)
        plt.close(fig)
    return figures


def _report(out: str, m: Dict, figures: Dict[str, str]) -> str:
    s = m["summary"]
    st = m["settings"]
    lines = ["# icl demo: ICL vs supervised-only on MNI brain tissue", "",
             f"Labeled fraction {st['labeled_fraction']:.3f} of {m['data']['counts']['train_slices']} training slices "
             f"(the rest unlabeled); {st['iterations']} iterations per run; batch {st['batch_size']} "
             f"({st['labeled_bs']} labeled); {st['seeds']} seed(s); device {m['device']}, "
             f"{m['torch_threads']} threads; total wall time {m['wall_s']:.0f} s.", "",
             "Dice is a fraction in [0, 1]; HD95 in pixels (about 1.96 mm). Means over the test volumes"
             + (" and over seeds (± one standard deviation of the mean Dice, in points)" if st["seeds"] > 1 else "") + ".", "",
             "## Corrupted test slices (headline)", "", "```", _table(s, "test_corrupted"), "```", "",
             "## Clean test slices", "", "```", _table(s, "test"), "```", ""]
    if "icl_minus_supervised_dice_points" in s:
        d = s["icl_minus_supervised_dice_points"]
        lines += [f"ICL minus supervised-only, mean Dice: {d['test_corrupted']:+.2f} points on the corrupted copy, "
                  f"{d['test']:+.2f} on clean slices.", ""]
    lines += ["## Runs", "", "| method | seed | wall time (s) | iterations | it/s | best val Dice (iteration) |",
              "|---|---|---|---|---|---|"]
    for r in m["runs"]:
        best = r.get("best") or {}
        bd = f"{best.get('mean_dice', float('nan')):.4f} ({best.get('iteration', '-')})" if best else "-"
        lines.append(f"| {NAMES[r['method']]} | {r['seed']} | {r['wall_s']:.1f} | {r['iterations']} | {r['it_per_s']:.2f} | {bd} |")
    lines += ["", "## Curves", "", f"![curves]({os.path.relpath(figures['curves'], out)})", "",
              "## Examples", "", f"![corrupted]({os.path.relpath(figures['overlay_corrupted'], out)})", "",
              f"![clean]({os.path.relpath(figures['overlay_clean'], out)})", "",
              f"Two-threshold rule: thresholds {m['threshold_rule']['thresholds'][0]:.3f} / "
              f"{m['threshold_rule']['thresholds'][1]:.3f} on normalised intensities, fitted on all training slices "
              "with their labels (a non-learning reference that sees more labels than the networks).", ""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
    return path
