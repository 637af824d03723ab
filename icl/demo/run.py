"""`icl demo`: ICL against the supervised-only baseline and a standard
semi-supervised peer, on a synthetic population of brains, offline, on a CPU.

Data: :mod:`icl.demo.population` (one subject's few labeled slices; many
unlabeled subjects of varied anatomy and contrast; held-out validation and test
subjects of the same distribution). Runs (same backbone, labeled slices,
iterations, weak augmentation and evaluation): supervised only, the peer
(``--peer``), ICL in this library's default configuration, and with ``--full``
the fully supervised upper bound. Scored per test subject (Dice and HD95 of
grey and white matter), overall and per contrast family (T1-like subjects and
subjects with other tissue contrasts).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import population

CLASSES = {1: "GM", 2: "WM"}

# What `--method icl` means in the demo: the library's default ICL configuration
# (docs/methods.md, "The label-efficiency benchmark", gives the measurements behind it).
ICL_DEFAULTS: Dict = {}
PEERS = ("mean-teacher", "fixmatch", "unimatch")
DEFAULT_PEER = "fixmatch"
DEFAULT_ITERATIONS = 1000
DEFAULT_LABELED_SLICES = 2


@dataclass
class DemoSettings:
    iterations: int
    batch_size: int
    labeled_bs: int
    val_every: int
    seeds: int
    full: bool
    size: int = 48
    labeled_slices: int = DEFAULT_LABELED_SLICES
    peer: str = DEFAULT_PEER
    labeled_fraction: Optional[float] = None  # set from the data (labeled slices / training slices)
    mixer: str = "conv"
    global_queries: str = "batch"
    intensity_aug: object = "default"  # the weak augmentation every method shares
    icl: Dict = field(default_factory=lambda: dict(ICL_DEFAULTS))

    @classmethod
    def preset(cls, quick: bool, gpu: bool) -> "DemoSettings":
        if quick:
            return cls(iterations=40, batch_size=8, labeled_bs=4, val_every=20, seeds=1, full=False, size=32)
        if gpu:
            return cls(iterations=4000, batch_size=16, labeled_bs=8, val_every=250, seeds=1, full=False)
        return cls(iterations=DEFAULT_ITERATIONS, batch_size=8, labeled_bs=4, val_every=100, seeds=1, full=False)


def population_spec(s: DemoSettings, quick: bool) -> "population.PopulationSpec":
    if quick:
        return population.PopulationSpec(size=s.size, labeled_slices=s.labeled_slices, train_slices=4,
                                         unlabeled_subjects=6, val_subjects=2, test_subjects=4, eval_slices=4)
    return population.PopulationSpec(size=s.size, labeled_slices=s.labeled_slices)


def _train(root: str, out: str, method: str, fraction: float, s: DemoSettings, seed: int, device: Optional[str],
           backend: str, progress: bool, **extra):
    from icl.train import TrainConfig, train

    cfg = TrainConfig(dataset="acdc", root=root, num_classes=3, labeled_fraction=fraction, patch_size=[s.size, s.size],
                      batch_size=s.batch_size, labeled_bs=s.labeled_bs, max_iterations=s.iterations,
                      val_every=s.val_every, save_every=0, out=out, method=method, mixer=s.mixer,
                      global_queries=s.global_queries, intensity_aug=s.intensity_aug, seed=seed, num_workers=0,
                      device=device, backend=backend, progress=progress, num_overlays=0,
                      overwrite=True, **extra)  # the demo owns its run folders: a rerun replaces them
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    return result, wall


def _evaluate(model, source, names: Sequence[str], device, size: int = 48) -> Dict:
    from icl.evaluate import evaluate_cases

    res = evaluate_cases(model, source, names, 3, [size, size], device=device, progress=False,
                         keep_predictions=len(names))
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


def _family_dice(cases, families: Dict[str, str]) -> Dict[str, float]:
    """Mean over test subjects of the GM/WM mean Dice, per contrast family.
    ``cases``: [(name, {class: {metric: value}})] as ``evaluate_cases`` returns."""
    per: Dict[str, List[float]] = {}
    for name, classes in cases:
        d = [float(v["dice"]) for k, v in classes.items() if str(k) in ("1", "2")]
        if name in families and d:
            per.setdefault(families[name], []).append(float(np.mean(d)))
    return {f: float(np.mean(v)) for f, v in per.items()}


NAMES = {"supervised": "supervised only", "icl": "ICL", "mean-teacher": "Mean Teacher", "fixmatch": "FixMatch",
         "unimatch": "UniMatch",
         "full": "fully supervised"}


def run_demo(out: str = "icl-demo", quick: bool = False, full: bool = False, seeds: Optional[int] = None,
             data_dir: Optional[str] = None, labeled_slices: Optional[int] = None, peer: Optional[str] = None,
             iterations: Optional[int] = None, device: Optional[str] = None, backend: str = "auto",
             progress: bool = True, jobs: Optional[int] = None, threads: Optional[int] = None, log=print) -> Dict:
    import torch

    gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    s = DemoSettings.preset(quick, gpu)
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {seeds}")
        s.seeds = seeds
    if labeled_slices is not None:
        if not 1 <= labeled_slices <= 8:
            raise ValueError(f"--labeled-slices must be in 1..8 (the labeled subject's slices), got {labeled_slices}")
        s.labeled_slices = labeled_slices
    if peer is not None:
        if peer not in PEERS + ("none",):
            raise ValueError(f"--peer must be one of {', '.join(PEERS + ('none',))}, got {peer!r}")
        s.peer = peer
    if iterations is not None:
        if iterations < 1:
            raise ValueError(f"--iterations must be >= 1, got {iterations}")
        s.iterations = iterations
        s.val_every = max(1, min(s.val_every, iterations))
    for name, v in (("--jobs", jobs), ("--threads", threads)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    s.full = full
    os.makedirs(out, exist_ok=True)
    root = data_dir or os.path.join(out, "data")
    t_start = time.perf_counter()
    meta = population.build_population(root, population_spec(s, quick), log=log, progress=progress)
    n_train = meta["counts"]["train_slices"]
    s.labeled_fraction = s.labeled_slices / n_train
    families = meta["test_contrast"]
    log(f"labeled: {s.labeled_slices} slices of one subject; unlabeled: the other {n_train - s.labeled_slices} "
        f"training slices ({meta['counts']['train'] - 1} subjects); {s.iterations} iterations per run, "
        f"{s.seeds} seed(s)")
    with open(os.path.join(root, "test.list")) as fh:
        test_names = [line.strip() for line in fh if line.strip()]
    methods = [("supervised", "supervised", s.labeled_fraction, {})]
    if s.peer != "none":
        methods.append((s.peer, s.peer, s.labeled_fraction, {}))
    methods.append(("icl", "icl", s.labeled_fraction, dict(s.icl)))
    if s.full:
        methods.append(("full", "supervised", 1.0, {}))
    tasks = [dict(root=root, out=out, label=label, method=method, fraction=fraction, extra=extra, s=s, seed=seed,
                  device=device, backend=backend, test_names=test_names, families=families)
             for seed in range(s.seeds) for label, method, fraction, extra in methods]
    jobs, threads = plan_jobs(len(tasks), gpu, jobs, threads)
    log(f"{len(tasks)} run(s), {jobs} at a time, {threads} thread(s) each"
        + (" (--jobs, --threads to change)" if jobs > 1 else ""))
    if jobs == 1:
        torch.set_num_threads(threads)
        results = []
        for t in tasks:
            log(f"[{NAMES[t['label']]}, seed {t['seed']}] training")
            results.append(_run_one(dict(t, progress=progress)))
            _log_result(log, results[-1][0])
    else:
        results = _run_parallel(tasks, jobs, threads, progress, log)
    runs = [r for r, _ in results]
    examples = {r["method"]: preds for r, preds in results if r["seed"] == 0}
    summary = _summarize(runs)
    metrics = {"settings": asdict(s), "data": {"root": os.path.abspath(root), "counts": meta["counts"],
                                               "test_contrast": families},
               "runs": runs, "summary": summary, "wall_s": round(time.perf_counter() - t_start, 1),
               "device": str(device or ("cuda" if gpu else "cpu")), "torch_threads": threads, "jobs": jobs}
    with open(os.path.join(out, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2)
    figures = _figures(out, runs, examples, root, families)
    report = _report(out, metrics, figures)
    log("\n" + _table(summary) + "\n")
    log(f"report: {report}")
    return metrics


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def plan_jobs(n_runs: int, gpu: bool, jobs: Optional[int] = None, threads: Optional[int] = None):
    """(runs at a time, threads per run). CPU default: one run per usable core, at
    most ``n_runs``, the cores shared out between them (on 2 cores: 2 runs of 1
    thread, which also makes each run the benchmark's one-thread run). GPU
    default: one run at a time on the device's default threads."""
    if jobs is not None and jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    cores = usable_cores()
    if jobs is None:
        jobs = 1 if gpu else max(1, min(n_runs, cores))
    jobs = min(jobs, max(1, n_runs))
    if threads is None:
        threads = max(1, cores // jobs)
    return jobs, threads


def _run_one(task: Dict):
    """Train one run and test its best-validation checkpoint. Returns (run record, test predictions)."""
    from icl.data import build_source

    s, seed, label = task["s"], task["seed"], task["label"]
    run_dir = os.path.join(task["out"], "runs", f"{label}-seed{seed}")
    result, wall = _train(task["root"], run_dir, task["method"], task["fraction"], s, seed, task["device"],
                          task["backend"], task.get("progress", False), **task["extra"])
    model = result.model.backbone if hasattr(result.model, "backbone") else result.model
    best = os.path.join(run_dir, "checkpoints", "best.pt")
    if os.path.isfile(best):  # evaluate the best-validation weights, as the trainer's test does
        from icl import checkpoint as C

        C.load_state(model, C.backbone_state(C.load(best)), what=best)
    dev = next(model.parameters()).device
    source = build_source("acdc", task["root"], 3)
    res = _evaluate(model, source, task["test_names"], dev, s.size)
    scores = _scores(res["summary"])
    scores.update({f"dice_{k}": v for k, v in _family_dice(res["cases"], task["families"]).items()})
    run = {"method": label, "seed": seed, "run_dir": os.path.relpath(run_dir, task["out"]),
           "wall_s": round(wall, 1), "iterations": result.iteration,
           "it_per_s": round(result.iteration / wall, 2), "best": result.metrics.get("best"), "test": scores}
    return run, (res["predictions"] if seed == 0 else None)


def _run_in_worker(task: Dict, threads: int):
    """One run in a worker process: its own thread count, its output in the run folder's stdout.log."""
    import contextlib

    import torch

    torch.set_num_threads(threads)
    run_dir = os.path.join(task["out"], "runs", f"{task['label']}-seed{task['seed']}")
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    with open(run_dir + ".stdout.log", "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        return _run_one(task)


# a run's relative cost, to start the longest first (measured: ICL ~2.6x, the peers ~1.6-1.9x supervised)
_COST = {"icl": 3, "fixmatch": 2, "mean-teacher": 2, "unimatch": 2, "full": 1, "supervised": 1}


def _log_result(log, run: Dict) -> None:
    sc = run["test"]
    log(f"[{NAMES[run['method']]}, seed {run['seed']}] test mean Dice {sc['dice_mean']:.4f} "
        f"(T1-like {sc.get('dice_t1', float('nan')):.4f}, other contrasts "
        f"{sc.get('dice_other', float('nan')):.4f}; {run['wall_s']:.0f} s)")


def _iterations_logged(task: Dict) -> int:
    path = os.path.join(task["out"], "runs", f"{task['label']}-seed{task['seed']}", "log.csv")
    try:
        with open(path, "rb") as fh:
            return max(0, fh.read().count(b"\n") - 1)
    except OSError:
        return 0


def _run_parallel(tasks: List[Dict], jobs: int, threads: int, progress: bool, log):
    """Runs in ``jobs`` spawned worker processes (a fresh one per run), longest
    first; one progress bar over all iterations (read from the runs' log.csv).
    A failed run stops the others at once. Results in ``tasks`` order."""
    import multiprocessing as mp

    order = sorted(range(len(tasks)), key=lambda i: -_COST.get(tasks[i]["label"], 1))
    results: List = [None] * len(tasks)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(t["s"].iterations for t in tasks), desc="training", unit="it", dynamic_ncols=True)
    pool = mp.get_context("spawn").Pool(jobs, maxtasksperchild=1)
    try:
        pending = {i: pool.apply_async(_run_in_worker, (tasks[i], threads)) for i in order}
        while pending:
            time.sleep(1.0)
            for i in [i for i, r in pending.items() if r.ready()]:
                try:
                    results[i] = pending.pop(i).get()
                except Exception as exc:
                    t = tasks[i]
                    run_dir = os.path.join(t["out"], "runs", f"{t['label']}-seed{t['seed']}")
                    msg = f"{NAMES[t['label']]}, seed {t['seed']}: {exc} (its output: {run_dir}.stdout.log)"
                    # a bad option stays a usage error (exit 2), anything else a fault
                    raise (ValueError if isinstance(exc, ValueError) else RuntimeError)(msg) from exc
                if bar is not None:
                    with bar.external_write_mode():
                        _log_result(log, results[i][0])
                else:
                    _log_result(log, results[i][0])
            if bar is not None:
                bar.n = sum(tasks[i]["s"].iterations if results[i] else _iterations_logged(tasks[i])
                            for i in range(len(tasks)))
                bar.refresh()
        pool.close()
    except BaseException:
        pool.terminate()  # the other runs would only delay the error (or the interrupt)
        raise
    finally:
        pool.join()
        if bar is not None:
            bar.close()
    return results


def _summarize(runs: List[Dict]) -> Dict:
    out: Dict = {}
    for label in dict.fromkeys(r["method"] for r in runs):
        sel = [r for r in runs if r["method"] == label]
        keys = sel[0]["test"].keys()
        entry = {"n": len(sel),
                 "test": {k: float(np.mean([r["test"].get(k, np.nan) for r in sel])) for k in keys},
                 "test_std": {k: float(np.std([r["test"].get(k, np.nan) for r in sel])) for k in keys},
                 "wall_s": float(np.mean([r["wall_s"] for r in sel])),
                 "it_per_s": float(np.mean([r["it_per_s"] for r in sel]))}
        out[label] = entry
    if "supervised" in out:
        base = out["supervised"]["test"]["dice_mean"]
        out["minus_supervised_dice_points"] = {k: 100 * (v["test"]["dice_mean"] - base)
                                               for k, v in out.items() if k not in ("supervised",) and "test" in v}
    return out


def _table(summary: Dict) -> str:
    head = (f"{'method':<18} {'Dice GM':>8} {'Dice WM':>8} {'Dice mean':>10} {'T1-like':>8} {'other':>8} "
            f"{'HD95 mean':>10}")
    lines = ["test subjects (per-subject means)", head, "-" * len(head)]
    for key in ("supervised", "mean-teacher", "fixmatch", "unimatch", "icl", "full"):
        if key not in summary:
            continue
        v = summary[key]["test"]
        sd = summary[key]["test_std"]
        pm = f" ±{100 * sd['dice_mean']:.1f}" if summary[key]["n"] > 1 else ""
        lines.append(f"{NAMES[key]:<18} {v['dice_GM']:>8.4f} {v['dice_WM']:>8.4f} {v['dice_mean']:>10.4f} "
                     f"{v.get('dice_t1', float('nan')):>8.4f} {v.get('dice_other', float('nan')):>8.4f} "
                     f"{v['hd95_mean']:>10.2f}{pm}")
    return "\n".join(lines)


def _figures(out: str, runs: List[Dict], examples: Dict, root: str, families: Dict[str, str]) -> Dict[str, str]:
    import csv

    import h5py
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    figures = {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        if r["seed"] != 0:
            continue
        log_path = os.path.join(out, r["run_dir"], "log.csv")
        if os.path.isfile(log_path):
            with open(log_path) as fh:
                rows = list(csv.DictReader(fh))
            it = np.array([float(x["iteration"]) for x in rows])
            vals = np.array([float(x["supervised"]) if x.get("supervised") not in (None, "") else np.nan for x in rows])
            if np.isfinite(vals).any():
                k = max(1, len(vals) // 50)
                smooth = np.convolve(np.nan_to_num(vals), np.ones(k) / k, mode="valid")
                axes[0].plot(it[k - 1:], smooth, label=NAMES[r["method"]])
        metrics_path = os.path.join(out, r["run_dir"], "metrics.json")
        if os.path.isfile(metrics_path):
            with open(metrics_path) as fh:
                val = json.load(fh).get("val") or []
            if val:
                axes[1].plot([v["iteration"] for v in val], [v["mean_dice"] for v in val], marker="o",
                             label=NAMES[r["method"]])
    axes[0].set_xlabel("iteration"); axes[0].set_ylabel("supervised loss"); axes[0].set_yscale("log")
    axes[0].legend(fontsize=8); axes[0].set_title("supervised loss on the labeled slices (moving average)")
    axes[1].set_xlabel("iteration"); axes[1].set_ylabel("mean Dice (GM, WM)"); axes[1].legend(fontsize=8)
    axes[1].set_title("validation Dice (held-out subjects)")
    fig.tight_layout()
    figures["curves"] = os.path.join(fig_dir, "curves.png")
    fig.savefig(figures["curves"], dpi=100)
    plt.close(fig)
    # one T1-like and one other-contrast test subject, middle slice
    picks = []
    for fam in ("t1", "other"):
        names = [c for c, f in families.items() if f == fam]
        if names:
            picks.append((fam, names[0]))
    cols = [("image", None), ("ground truth", "gt")] + [(NAMES[k], k) for k in examples]
    if picks:
        fig, axes = plt.subplots(len(picks), len(cols), figsize=(2.6 * len(cols), 2.8 * len(picks)), squeeze=False)
        for row, (fam, case) in enumerate(picks):
            with h5py.File(os.path.join(root, "data", case + ".h5"), "r") as f:
                img, lab = f["image"][()], f["label"][()]
            z = img.shape[0] // 2
            for ax, (title, key) in zip(axes[row], cols):
                ax.imshow(img[z], cmap="gray", vmin=0, vmax=1)
                seg = lab if key == "gt" else (examples.get(key, {}).get(case) if key else None)
                if seg is not None:
                    ax.imshow(np.ma.masked_equal(seg[z], 0), cmap="autumn", alpha=0.45, vmin=1, vmax=2)
                ax.set_title(f"{title}" + (f"\n{case} ({'T1-like' if fam == 't1' else 'other contrast'})"
                                           if key is None else ""), fontsize=8)
                ax.axis("off")
        fig.suptitle("test subjects: grey matter red, white matter yellow", fontsize=9)
        fig.tight_layout()
        figures["overlay"] = os.path.join(fig_dir, "overlay.png")
        fig.savefig(figures["overlay"], dpi=100)
        plt.close(fig)
    return figures


def _report(out: str, m: Dict, figures: Dict[str, str]) -> str:
    s = m["summary"]
    st = m["settings"]
    c = m["data"]["counts"]
    fams = list(m["data"]["test_contrast"].values())
    lines = ["# icl demo: ICL vs supervised-only and a semi-supervised peer on a synthetic brain population", "",
             f"{st['labeled_slices']} labeled slices of one subject, {c['train_slices'] - st['labeled_slices']} "
             f"unlabeled slices of {c['train'] - 1} other subjects; {c['val']} validation and {c['test']} test "
             f"subjects ({fams.count('t1')} T1-like, {fams.count('other')} other contrasts), {st['size']}x{st['size']} "
             f"px. {st['iterations']} iterations per run; batch {st['batch_size']} ({st['labeled_bs']} labeled); "
             f"{st['seeds']} seed(s); device {m['device']}, {m.get('jobs', 1)} run(s) at a time, "
             f"{m['torch_threads']} thread(s) each; total wall time "
             f"{m['wall_s']:.0f} s. The best checkpoint on the validation subjects is tested.", "",
             "Dice is a fraction in [0, 1]; HD95 in pixels. Means over test subjects"
             + (" and over seeds (± one standard deviation of the mean Dice, in points)" if st["seeds"] > 1 else "")
             + ".", "", "```", _table(s), "```", ""]
    d = s.get("minus_supervised_dice_points") or {}
    if d:
        lines += ["Difference to supervised only, mean Dice: "
                  + ", ".join(f"{NAMES[k]} {v:+.2f} points" for k, v in d.items()) + ".", ""]
        if st["seeds"] == 1:
            lines += ["One seed: differences of a few points are within the seed-to-seed spread measured by "
                      "`python -m benches.ssl` (docs/methods.md, \"The label-efficiency benchmark\").", ""]
    lines += ["## Runs", "", "| method | seed | wall time (s) | iterations | it/s | best val Dice (iteration) |",
              "|---|---|---|---|---|---|"]
    for r in m["runs"]:
        best = r.get("best") or {}
        bd = f"{best.get('mean_dice', float('nan')):.4f} ({best.get('iteration', '-')})" if best else "-"
        lines.append(f"| {NAMES[r['method']]} | {r['seed']} | {r['wall_s']:.1f} | {r['iterations']} | "
                     f"{r['it_per_s']:.2f} | {bd} |")
    lines += ["", "## Curves", "", f"![curves]({os.path.relpath(figures['curves'], out)})", ""]
    if "overlay" in figures:
        lines += ["## Examples", "", f"![examples]({os.path.relpath(figures['overlay'], out)})", ""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
    return path
