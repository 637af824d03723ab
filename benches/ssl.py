"""Label-efficiency benchmark: semi-supervised methods x seeds x labeled budgets on
a synthetic task (``--task``):

- ``brain`` (default): grey/white matter on the brain population
  (:mod:`icl.demo.population`), 48x48, budgets in labeled slices of one
  subject; its headroom is contrast (most test subjects have other contrasts);
- ``lesions``: lesions of varied size, place and appearance on one contrast
  family (:mod:`icl.demo.lesions`), 64x64, budgets in labeled *subjects* (all
  their slices); its headroom is in-distribution label scarcity.

    python -m benches.ssl                       # the committed brain table (3 seeds)
    python -m benches.ssl --task lesions        # the committed lesion table
    python -m benches.ssl --quick               # a smoke run (tiny population, a few iterations)
    python -m benches.ssl --methods supervised,icl --seeds 1 --iterations 500
    python -m benches.ssl --task lesions --profile gpu   # paper-like scale on one GPU (about 8 minutes)
    python -m benches.ssl --task lesions --profile gpu --dry-run   # its plan, without running

``--profile gpu`` (lesions) sets 128x128 slices, 3000 iterations (validation every 300), the
device ``cuda`` and 14 runs side by side as separate processes with one CPU
thread each (a 16-core GPU machine; eager training at this size is bound by the
host, so runs in parallel share the GPU well), results under
``benches/results/<gpu name>/ssl-lesions``; every value it sets can still be given.

Every run is one ``icl train`` subprocess (same backbone, data pipeline, labeled
slices, iterations, weak augmentation and evaluation for every method), with
``OMP_NUM_THREADS`` = ``--threads`` (default 1) and ``--jobs`` runs at a time.
A run whose ``metrics.json`` already holds a test result is reused, so a killed
table continues where it stopped; so is a row of an earlier ``runs.csv`` in
``--out`` with the same ``icl train`` command (its commit and time stay as
recorded; ``--fresh`` reruns the requested runs; earlier rows of other runs
stay listed either way). The checkpoint that is tested is the best on
the validation subjects; the test subjects are never used for a choice.

Outputs (``--out``, default ``benches/results/cpu/ssl`` for ``brain``,
``benches/results/cpu/ssl-lesions`` for ``lesions``): ``runs.csv`` (one row per
run: test Dice overall and, for ``brain``, per contrast family, HD95, wall time,
command),
``summary.md`` (mean +- sample standard deviation over seeds), ``ssl.png``.
``--csv``/``--plot`` copy the CSV / the plot elsewhere.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

import numpy as np

# name -> (label, extra `icl train` arguments, labeled: "budget" or "all")
METHODS: Dict[str, tuple] = {
    "supervised": ("supervised only", ["--method", "supervised"], "budget"),
    "mean-teacher": ("Mean Teacher", ["--method", "mean-teacher"], "budget"),
    "fixmatch": ("FixMatch", ["--method", "fixmatch"], "budget"),
    "icl": ("ICL (published formulation)", ["--method", "icl"], "budget"),
    "icl-ws": ("ICL, weak-strong views", ["--method", "icl", "--icl-views", "weak-strong"], "budget"),
    "icl-ws-all": ("ICL, weak-strong views incl. the backbone",
                   ["--method", "icl", "--icl-views", "weak-strong-all"], "budget"),
    "icl-rampup": ("ICL, consistency ramp-up over 40% of the iterations",
                   ["--method", "icl", "--consistency-rampup", "400"], "budget"),
    "icl-memory": ("ICL, prototype memory as USCL's queries", ["--method", "icl", "--global-queries", "memory"],
                   "budget"),
    "icl-confident": ("ICL + confident weak-to-strong pseudo-labels (FixMatch term)",
                      ["--method", "icl", "--icl-views", "weak-strong-confident"], "budget"),
    "icl-one-confident": ("ICL (published one-view stream) + FixMatch term on a separate strong view",
                          ["--method", "icl", "--icl-views", "one-confident"], "budget"),
    "unimatch": ("UniMatch-style (two strong views + feature perturbation)", ["--method", "unimatch"], "budget"),
    "fixmatch-t90": ("FixMatch, threshold 0.9", ["--method", "fixmatch", "--confidence-threshold", "0.9"], "budget"),
    "icl-confident-rampup": ("ICL + confident weak-to-strong pseudo-labels, consistency ramp-up 40%",
                             ["--method", "icl", "--icl-views", "weak-strong-confident", "--consistency-rampup",
                              "400"], "budget"),
    "icl-ws-memory": ("ICL, weak-strong views, prototype memory",
                      ["--method", "icl", "--icl-views", "weak-strong", "--global-queries", "memory"], "budget"),
    "icl-consistency10": ("ICL, consistency weight 10 (published: 50)",
                          ["--method", "icl", "--loss-weights", "consistency=10"], "budget"),
    "icl-joint": ("ICL, one backbone pass over labeled and unlabeled images",
                  ["--method", "icl", "--icl-passes", "joint"], "budget"),
    "icl-confident-joint": ("ICL + confident weak-to-strong pseudo-labels, one backbone pass",
                            ["--method", "icl", "--icl-views", "weak-strong-confident", "--icl-passes", "joint"],
                            "budget"),
    "icl-aux-only": ("ICL's supervised and auxiliary terms only (unlabeled terms weighted 0)",
                     ["--method", "icl", "--loss-weights", "pseudo=0,consistency=0"], "budget"),
    "icl-confident-aux-only": ("FixMatch term + ICL's supervised and auxiliary terms (ICL's unlabeled terms weighted 0)",
                               ["--method", "icl", "--icl-views", "weak-strong-confident", "--loss-weights",
                                "pseudo=0,consistency=0"], "budget"),
    "icl-confident-aux-only-joint": ("FixMatch term + ICL's supervised and auxiliary terms, one backbone pass",
                                     ["--method", "icl", "--icl-views", "weak-strong-confident", "--icl-passes",
                                      "joint", "--loss-weights", "pseudo=0,consistency=0"], "budget"),
    "icl-confident-joint-no-pseudo": ("ICL + FixMatch term, one backbone pass, pseudo term weighted 0",
                                      ["--method", "icl", "--icl-views", "weak-strong-confident", "--icl-passes",
                                       "joint", "--loss-weights", "pseudo=0"], "budget"),
    "icl-confident-joint-no-consistency": ("ICL + FixMatch term, one backbone pass, consistency term weighted 0",
                                           ["--method", "icl", "--icl-views", "weak-strong-confident",
                                            "--icl-passes", "joint", "--loss-weights", "consistency=0"], "budget"),
    "full": ("fully supervised (all training slices labeled)", ["--method", "supervised"], "all"),
}
DEFAULT_METHODS = ["supervised", "mean-teacher", "fixmatch", "icl", "icl-ws", "full"]
LESION_METHODS = ["supervised", "mean-teacher", "fixmatch", "icl", "full"]

COLUMNS = ["method", "seed", "labeled_slices", "dice_mean", "dice_gm", "dice_wm", "dice_t1", "dice_other",
           "hd95_mean", "val_dice", "best_iteration", "iterations", "wall_s", "it_per_s", "threads", "git_commit",
           "machine", "timestamp", "command", "task", "labeled_subjects", "dice_lesion"]

# task -> what differs between the tasks (the brain task's commands and columns are as they were,
# so its committed runs.csv rows are still recognised and reused)
TASKS: Dict[str, Dict] = {
    "brain": {"title": "the synthetic brain population (grey and white matter)", "num_classes": 3,
              "size": 48, "budgets": "2", "budget_unit": "labeled slices",
              "out": os.path.join("benches", "results", "cpu", "ssl")},
    "lesions": {"title": "the synthetic lesion population (one contrast family)", "num_classes": 2,
                "size": 64, "budgets": "1,3", "budget_unit": "labeled subjects (all their slices)",
                "out": os.path.join("benches", "results", "cpu", "ssl-lesions")},
}
for _task, _its in (("brain", 1000), ("lesions", 1500)):
    TASKS[_task]["iterations"] = _its
# what --profile sets unless given (gpu: sized for about 8 minutes of one H100/H200 with 16 cores:
# 27 runs in two waves of 14)
PROFILES: Dict[str, Dict] = {"cpu": {}, "gpu": {"size": 128, "iterations": 3000, "val_every": 300, "jobs": 14,
                                                "device": "cuda"}}


def _gpu_folder() -> str:
    """benches/results/<this>: the GPU's folder as the GPU check names it, else 'gpu'."""
    from .gpu_check import gpu_info

    return gpu_info()["slug"] or "gpu"


def _git_commit() -> str:
    from .common import git_commit

    return git_commit()


def _machine() -> str:
    from .common import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benches.ssl", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="brain", choices=list(TASKS),
                   help="brain: tissue on the brain population (default); lesions: lesions, one contrast family")
    p.add_argument("--profile", default="cpu", choices=list(PROFILES),
                   help="cpu: the committed CPU tables (default); gpu: paper-like scale on one GPU (lesions)")
    p.add_argument("--dry-run", action="store_true", help="print the runs (their icl train commands) and stop")
    p.add_argument("--methods", help=f"comma-separated, from {', '.join(METHODS)} (default "
                                     f"{','.join(DEFAULT_METHODS)}; for lesions {','.join(LESION_METHODS)})")
    p.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 (default 3)")
    p.add_argument("--budgets", help="comma-separated labeled budgets: slices of one subject for brain (default 2), "
                                     "subjects for lesions (default 1,3)")
    p.add_argument("--iterations", type=int, help="per run (default 1000; 1500 for lesions; 3000 with --profile gpu)")
    p.add_argument("--batch-size", type=int, default=8, help="per step; half of it labeled (default 8)")
    p.add_argument("--size", type=int, help="slice size in pixels, a multiple of 16 (default 48 for brain, "
                                            "64 for lesions)")
    p.add_argument("--val-every", type=int, help="validation interval (default 100; 300 with --profile gpu)")
    p.add_argument("--jobs", type=int, help="runs at a time (default 2; 14 with --profile gpu)")
    p.add_argument("--threads", type=int, default=1, help="OMP/torch threads per run (default 1)")
    p.add_argument("--out", help="results folder (default benches/results/cpu/ssl for brain, "
                                 "benches/results/cpu/ssl-lesions for lesions)")
    p.add_argument("--data-dir", help="population folder (default OUT/data)")
    p.add_argument("--population-seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny population and 20 iterations (smoke test)")
    p.add_argument("--csv", help="also write the runs CSV here")
    p.add_argument("--plot", help="also write the plot (PNG) here")
    p.add_argument("--device", help="cpu (default) or cuda (the default of --profile gpu)")
    p.add_argument("--fresh", action="store_true",
                   help="rerun the requested runs, ignoring their earlier results in --out")
    args = p.parse_args(argv)
    if args.methods is None:
        args.methods = ",".join(LESION_METHODS if args.task == "lesions" else DEFAULT_METHODS)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    task = TASKS[args.task]
    if args.profile == "gpu" and args.task != "lesions":
        p.error("--profile gpu: defined for --task lesions only")
    defaults = dict(budgets=task["budgets"], size=task["size"], out=task["out"], iterations=task["iterations"],
                    val_every=100, jobs=2, device="cpu")
    defaults.update(PROFILES[args.profile])
    if args.profile == "gpu":
        defaults["out"] = os.path.join("benches", "results", _gpu_folder(), "ssl-lesions")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; expected some of {', '.join(METHODS)}")
    try:
        args.budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        p.error(f"--budgets: expected comma-separated integers, got {args.budgets!r}")
    if not args.budgets or min(args.budgets) < 1:
        p.error(f"--budgets: every budget must be >= 1 ({task['budget_unit']})")
    for name in ("seeds", "iterations", "batch_size", "jobs", "threads", "val_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.size % 16:
        p.error(f"--size must be a multiple of 16, got {args.size}")
    if args.batch_size < 2:
        p.error("--batch-size must be >= 2 (half labeled, half unlabeled)")
    if args.quick:
        args.iterations = min(args.iterations, 10)
        args.val_every = min(args.val_every, 5)
    return args


def population_spec(args):
    if args.task == "lesions":
        from icl.demo.lesions import LesionSpec

        if args.quick:
            return LesionSpec(size=32, train_subjects=max(4, max(args.budgets) + 1), train_slices=3, val_subjects=2,
                              test_subjects=3, eval_slices=4, seed=args.population_seed)
        return LesionSpec(size=args.size, seed=args.population_seed)
    from icl.demo.population import PopulationSpec

    if args.quick:
        return PopulationSpec(size=32, labeled_slices=max(args.budgets), train_slices=max(4, max(args.budgets)),
                              unlabeled_subjects=4, val_subjects=2, test_subjects=3, eval_slices=4,
                              seed=args.population_seed)
    return PopulationSpec(size=args.size, labeled_slices=min(max(args.budgets), 8), seed=args.population_seed)


def earlier_rows(args) -> Dict[str, Dict]:
    """Rows of an earlier runs.csv in --out, by command (what makes a run the same run)."""
    path = os.path.join(args.out, "runs.csv")
    if not os.path.isfile(path):
        return {}
    with open(path, newline="") as fh:
        return {r["command"]: r for r in csv.DictReader(fh) if r.get("command")}


def run_command(args, meta: Dict, root: str, method: str, seed: int, budget: int) -> List[str]:
    """The ``icl train`` command line of one run (its identity: runs.csv rows are reused by it)."""
    label, extra, labeled = METHODS[method]
    n_train = meta["counts"]["train_slices"]
    run_dir = os.path.join(args.out, "runs", f"{method}-b{budget}-s{seed}")
    size = meta["params"]["size"]
    if labeled == "all":
        labels = ["--labeled-fraction", repr(1.0)]
    elif args.task == "lesions":  # subjects, all their slices (the prefix of a slice name is its subject)
        labels = ["--labeled-num", str(budget)]
    else:
        labels = ["--labeled-fraction", repr(budget / n_train)]
    # lesions: the generic ACDC layout (--dataset synthetic), where --labeled-num counts subjects, not the
    # published patients-to-slices table
    dataset = "synthetic" if args.task == "lesions" else "acdc"
    cmd = [sys.executable, "-m", "icl", "train", "--dataset", dataset, "--root", root, "--num-classes",
           str(TASKS[args.task]["num_classes"])] + labels + ["--patch-size", str(size), str(size),
           "--batch-size", str(args.batch_size), "--labeled-bs", str(args.batch_size // 2),
           "--max-iterations", str(args.iterations), "--val-every", str(args.val_every), "--save-every", "0",
           "--intensity-aug", "default", "--seed", str(seed), "--num-workers", "0", "--device", args.device,
           "--out", run_dir, "--no-progress"] + extra
    return cmd


def _run_one(args, meta: Dict, root: str, method: str, seed: int, budget: int, log, earlier=None) -> Dict:
    label, extra, labeled = METHODS[method]
    n_train = meta["counts"]["train_slices"]
    run_dir = os.path.join(args.out, "runs", f"{method}-b{budget}-s{seed}")
    metrics_path = os.path.join(run_dir, "metrics.json")
    cmd = run_command(args, meta, root, method, seed, budget)
    command = " ".join(shlex.quote(c) for c in cmd[1:])
    wall = None
    done = None
    if not args.fresh and not os.path.isfile(metrics_path) and earlier and command in earlier:
        row = {k: earlier[command].get(k, "") for k in COLUMNS}
        row["labeled_slices"], row["seed"] = int(row["labeled_slices"]), int(row["seed"])  # as a fresh run's
        row["task"] = row["task"] or args.task
        log(f"[{method} budget {budget} seed {seed}] reused from runs.csv (commit {row['git_commit']}, "
            f"{row['timestamp']}): test Dice {float(row['dice_mean']):.4f}")
        return row
    if args.fresh and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    if os.path.isfile(metrics_path):
        with open(metrics_path) as fh:
            done = json.load(fh)
        if "test" not in done or done.get("config", {}).get("max_iterations") != args.iterations:
            done = None
    if done is None:
        if os.path.isdir(run_dir):
            shutil.rmtree(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        t0 = time.perf_counter()
        with open(os.path.join(run_dir, "stdout.log"), "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{method} seed {seed}: icl train exited {proc.returncode}; see {run_dir}/stdout.log")
        with open(metrics_path) as fh:
            done = json.load(fh)
        ran = {"wall_s": wall, "threads": args.threads, "git_commit": _git_commit(),
               "timestamp": _dt.datetime.now().isoformat(timespec="seconds")}
        with open(os.path.join(run_dir, "wall.json"), "w") as fh:
            json.dump(ran, fh)
    else:  # a finished run from an earlier invocation: report what it recorded
        try:
            with open(os.path.join(run_dir, "wall.json")) as fh:
                ran = json.load(fh)
            wall = ran["wall_s"]
        except (OSError, KeyError, ValueError):
            ran, wall = {}, float("nan")
    test = done["test"]
    pc = test["per_class"]
    common = {"method": method, "seed": seed, "task": args.task,
              "val_dice": (done.get("best") or {}).get("mean_dice", ""),
              "best_iteration": (done.get("best") or {}).get("iteration"), "iterations": done.get("iteration"),
              "wall_s": round(wall, 1) if wall is not None else "", "threads": ran.get("threads", ""),
              "it_per_s": round(done.get("iteration", 0) / wall, 2) if wall else "",
              "git_commit": ran.get("git_commit", ""), "machine": _machine(), "timestamp": ran.get("timestamp", ""),
              "command": command}
    if args.task == "lesions":
        per_subject = meta["params"]["train_slices"]
        subjects = meta["counts"]["train"] if labeled == "all" else budget
        row = dict(common, labeled_slices=subjects * per_subject, labeled_subjects=subjects,
                   dice_mean=pc["1"]["dice"], dice_lesion=pc["1"]["dice"], hd95_mean=pc["1"]["hd95"])
        log(f"[{method} budget {budget} seed {seed}] test lesion Dice {row['dice_mean']:.4f}, {row['wall_s']} s")
        return row
    # per contrast family, from the per-case results
    family = meta["test_contrast"]
    per_case: Dict[str, List[float]] = {}
    with open(os.path.join(run_dir, "test", "cases.csv")) as fh:
        for r in csv.DictReader(fh):
            if r["class"] in ("1", "2"):
                per_case.setdefault(r["case"], []).append(float(r["dice"]))
    case_mean = {c: float(np.mean(v)) for c, v in per_case.items()}

    def fam(f):
        v = [d for c, d in case_mean.items() if family.get(c) == f]
        return float(np.mean(v)) if v else float("nan")

    row = dict(common, labeled_slices=n_train if labeled == "all" else budget,
               dice_mean=float(np.mean([pc["1"]["dice"], pc["2"]["dice"]])), dice_gm=pc["1"]["dice"],
               dice_wm=pc["2"]["dice"], dice_t1=fam("t1"), dice_other=fam("other"),
               hd95_mean=float(np.mean([pc["1"]["hd95"], pc["2"]["hd95"]])))
    log(f"[{method} budget {budget} seed {seed}] test Dice {row['dice_mean']:.4f} "
        f"(T1-like {row['dice_t1']:.4f}, other contrast {row['dice_other']:.4f}), {row['wall_s']} s")
    return row


def summarize(rows: List[Dict]) -> List[Dict]:
    out = []
    keys = []
    for r in rows:
        k = (r["method"], r["labeled_slices"])
        if k not in keys:
            keys.append(k)
    for method, budget in keys:
        sel = [r for r in rows if r["method"] == method and r["labeled_slices"] == budget]
        e = {"method": method, "labeled_slices": budget, "n": len(sel),
             "labeled_subjects": sel[0].get("labeled_subjects", "")}
        for k in ("dice_mean", "dice_t1", "dice_other", "hd95_mean", "val_dice", "wall_s"):
            v = np.array([float(r[k]) for r in sel if r.get(k) not in ("", None)], dtype=float)
            e[k] = float(np.mean(v)) if len(v) else float("nan")
            e[k + "_sd"] = float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
        out.append(e)
    return out


def _lesion_markdown(summary: List[Dict], args, meta: Dict, wall: float, rows: List[Dict]) -> str:
    base = {e["labeled_slices"]: e for e in summary if e["method"] == "supervised"}
    lines = ["| method | labeled subjects (slices) | test Dice (lesion) | vs supervised | HD95 (px) | validation Dice "
             "| wall time per run (s) |", "|---|---|---|---|---|---|---|"]
    for e in summary:
        b = base.get(e["labeled_slices"])
        diff = f"{100 * (e['dice_mean'] - b['dice_mean']):+.1f}" if b is not None and e["method"] != "supervised" else ""

        def pm(k):
            sd = e[k + "_sd"]
            return f"{e[k]:.3f}" + (f" ± {sd:.3f}" if np.isfinite(sd) else "")

        lines.append(f"| {METHODS[e['method']][0]} | {e['labeled_subjects']} ({e['labeled_slices']}) | {pm('dice_mean')} "
                     f"| {diff} | {pm('hd95_mean')} | "
                     f"{pm('val_dice') if np.isfinite(e['val_dice']) else 'not recorded'} | {e['wall_s']:.0f} |")
    c = meta["counts"]
    lines += ["", f"Mean ± sample standard deviation over {args.seeds} training seed(s) (seeds 0..{args.seeds - 1}); "
              f"one lesion population (seed {args.population_seed}, T1 contrast family only): {c['train']} training "
              f"subjects ({c['train_slices']} slices; the first N subjects are the labeled ones), {c['val']} "
              f"validation and {c['test']} test subjects, {meta['params']['size']}x{meta['params']['size']} px, "
              f"lesions {100 * meta['lesion_share']:.1f}% of the pixels. {args.iterations} iterations, batch "
              f"{args.batch_size} ({args.batch_size // 2} labeled), best-validation checkpoint tested, "
              f"{args.jobs} run(s) at a time with {args.threads} thread(s) each; {_machine()}. "
              f"Commits of the runs: {', '.join(sorted({str(r['git_commit']) for r in rows if r['git_commit']}))} "
              f"(per run in runs.csv, with its wall time); this invocation took {wall:.0f} s at commit "
              f"{_git_commit()}."]
    return "\n".join(lines)


def markdown(summary: List[Dict], args, meta: Dict, wall: float, rows: List[Dict]) -> str:
    if args.task == "lesions":
        return _lesion_markdown(summary, args, meta, wall, rows)
    base = {e["labeled_slices"]: e for e in summary if e["method"] == "supervised"}
    lines = ["| method | labeled slices | test Dice (GM, WM mean) | vs supervised | T1-like subjects | other contrasts "
             "| HD95 (px) | validation Dice | wall time per run (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        b = base.get(e["labeled_slices"])
        diff = f"{100 * (e['dice_mean'] - b['dice_mean']):+.1f}" if b is not None and e["method"] != "supervised" else ""

        def pm(k):
            sd = e[k + "_sd"]
            return f"{e[k]:.3f}" + (f" ± {sd:.3f}" if np.isfinite(sd) else "")

        lines.append(f"| {METHODS[e['method']][0]} | {e['labeled_slices']} | {pm('dice_mean')} | {diff} | "
                     f"{pm('dice_t1')} | {pm('dice_other')} | {e['hd95_mean']:.2f} | "
                     f"{pm('val_dice') if np.isfinite(e['val_dice']) else 'not recorded'} | {e['wall_s']:.0f} |")
    c = meta["counts"]
    fam = list(meta["test_contrast"].values())
    lines += ["", f"Mean ± sample standard deviation over {args.seeds} training seed(s) (seeds 0..{args.seeds - 1}); "
              f"one population (seed {args.population_seed}): {c['train']} training subjects "
              f"({c['train_slices']} slices, {len(meta['labeled_slices'])} of them labeled at most), {c['val']} validation and {c['test']} test "
              f"subjects ({fam.count('t1')} T1-like, {fam.count('other')} other contrasts), "
              f"{meta['params']['size']}x{meta['params']['size']} px. {args.iterations} iterations, batch "
              f"{args.batch_size} ({args.batch_size // 2} labeled), best-validation checkpoint tested, "
              f"{args.jobs} run(s) at a time with {args.threads} thread(s) each; {_machine()}. "
              f"Commits of the runs: {', '.join(sorted({str(r['git_commit']) for r in rows if r['git_commit']}))} "
              f"(per run in runs.csv, with its wall time); this invocation took {wall:.0f} s at commit "
              f"{_git_commit()}."]
    return "\n".join(lines)


def plot(summary: List[Dict], path: str, task: str = "brain") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = len(summary) > 8  # long tables: wider figure, slanted names
    fig, ax = plt.subplots(figsize=(max(9.0, 0.6 * len(summary)), 5 if many else 4))
    names = [f"{e['method']} ({e['labeled_slices']})" if many else f"{e['method']}\n({e['labeled_slices']})"
             for e in summary]
    x = np.arange(len(summary))
    bars = ((-0.27, "dice_mean", "all test subjects"), (0.0, "dice_t1", "T1-like"),
            (0.27, "dice_other", "other contrasts"))
    if task == "lesions":
        bars = ((0.0, "dice_mean", "test subjects"),)
    for off, key, lab in bars:
        ax.bar(x + off, [e[key] for e in summary], 0.27,
               yerr=[e[key + "_sd"] if np.isfinite(e[key + "_sd"]) else 0 for e in summary], label=lab, capsize=3)
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=8, rotation=35 if many else 0, ha="right" if many else "center")
    ax.set_ylabel("test Dice (lesion)" if task == "lesions" else "test Dice (GM, WM mean)")
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    ax.set_title(f"label efficiency on {TASKS[task]['title']} (mean ± sd over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.task == "lesions":
        from icl.demo.lesions import build_lesion_population as build
    else:
        from icl.demo.population import build_population as build

    if not args.dry_run:
        os.makedirs(args.out, exist_ok=True)
    root = args.data_dir or os.path.join(args.out, "data")
    t0 = time.perf_counter()
    spec = population_spec(args)
    if args.dry_run:  # what the commands need, without building the population
        per = spec.train_slices
        subjects = spec.train_subjects if args.task == "lesions" else spec.unlabeled_subjects + 1
        meta = {"params": spec.params(), "counts": {"train": subjects, "train_slices": subjects * per}}
    else:
        meta = build(root, spec)
    earlier = {} if args.dry_run else earlier_rows(args)
    jobs = [(m, s, b) for b in args.budgets for s in range(args.seeds) for m in args.methods
            if not (METHODS[m][2] == "all" and b != args.budgets[0])]
    print(f"{len(jobs)} run(s), {args.jobs} at a time, {args.threads} thread(s) each", flush=True)
    if args.dry_run:
        for m, s_, b in jobs:
            print(f"{m} budget {b} seed {s_}: {shlex.join(run_command(args, meta, root, m, s_, b)[1:])}")
        return 0
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="runs", dynamic_ncols=True)

    def one(job):
        row = _run_one(args, meta, root, *job, log=bar.write, earlier=earlier)
        bar.update(1)
        return row

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(one, jobs))
    bar.close()
    wall = time.perf_counter() - t0
    csv_path = os.path.join(args.out, "runs.csv")
    ran = {r["command"] for r in rows}
    kept = [r for c, r in earlier.items() if c not in ran]  # earlier runs outside this invocation stay listed
    for path in [csv_path] + ([args.csv] if args.csv else []):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows + [{k: r.get(k, "") for k in COLUMNS} for r in kept])
    summary = summarize(rows)
    md = markdown(summary, args, meta, wall, rows)
    with open(os.path.join(args.out, "summary.md"), "w") as fh:
        fh.write(md + "\n")
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump({"summary": summary, "wall_s": wall, "args": {k: v for k, v in vars(args).items()}}, fh, indent=1)
    for path in [os.path.join(args.out, "ssl.png")] + ([args.plot] if args.plot else []):
        plot(summary, path, args.task)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
