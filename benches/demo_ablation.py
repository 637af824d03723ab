"""Ablation of ICL's design choices on the demo task (how the defaults were chosen).

Run from a checkout:  python -m benches.demo_ablation [--seeds 3] [--iterations N] [--csv FILE]

For each configuration (spatial mixer mlp|conv x global queries memory|batch,
plus the supervised-only baseline) and seed, trains with the demo's settings
(:mod:`icl.demo.run`) in a fresh subprocess and records: mean Dice on the
corrupted and the clean test slices, iterations per second, parameters and the
process's peak resident memory. Rows use the benchmark CSV columns
(op=demo_ablation; metric one of dice_corrupted, dice_clean, it_per_s,
parameters, peak_rss; p50/p20/p80 = median/min/max over seeds).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from . import common

CONFIGS = [
    ("supervised", None, None),
    ("icl", "conv", "memory"),
    ("icl", "conv", "batch"),
    ("icl", "mlp", "memory"),
    ("icl", "mlp", "batch"),
]


def one_run(method: str, mixer: str, gq: str, seed: int, iterations: int, data: str, out: str) -> dict:
    """Train and evaluate one configuration in this process; returns the measurements."""
    from icl.data import build_source
    from icl.demo import brain
    from icl.demo.run import DemoSettings, _evaluate, _scores, _train

    s = DemoSettings.preset(quick=False, gpu=False)
    # the MNI-slab task this ablation was measured on (its size, labeled share, augmentation)
    s.size, s.labeled_fraction = 96, 2 / 60
    s.intensity_aug = {"gamma": 0.5, "noise": 0.5, "bias": 0.5, "gamma_range": [0.6, 1.7], "noise_std": 0.05,
                       "bias_strength": 0.35}
    s.iterations = iterations
    s.val_every = max(1, iterations // 5)
    if mixer:
        s.mixer, s.global_queries = mixer, gq
    result, wall = _train(data, out, method, s.labeled_fraction, s, seed, "cpu", "auto", progress=False)
    model = result.model.backbone if hasattr(result.model, "backbone") else result.model
    source = build_source("acdc", data, 3)
    res = {}
    for split in ("test", "test_corrupted"):
        names = [c for c, *_ in brain.load_split(data, split)]
        res[split] = _scores(_evaluate(model, source, names, torch.device("cpu"), 96)["summary"])["dice_mean"]
    return {"dice_clean": res["test"], "dice_corrupted": res["test_corrupted"],
            "it_per_s": result.iteration / wall, "parameters": sum(p.numel() for p in result.model.parameters()),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--iterations", type=int, default=None, help="default: the demo's default")
    p.add_argument("--data-dir", default=None, help="the demo data set (built there if missing)")
    p.add_argument("--csv", default=None)
    p.add_argument("--json", default=None, help="write every run's measurements here")
    p.add_argument("--_child", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        method, mixer, gq, seed, iterations, data, out = args._child
        r = one_run(method, None if mixer == "-" else mixer, gq, int(seed), int(iterations), data, out)
        print("RESULT " + json.dumps(r))
        return
    from icl.demo import brain
    iterations = args.iterations or 1000  # the MNI-slab demo's schedule
    data = args.data_dir or os.path.join(tempfile.gettempdir(), "icl-demo-data")
    brain.build(data)
    env = common.environment(torch.device("cpu"))
    rec = common.Recorder("demo_ablation", env)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, mixer, gq in CONFIGS:
            name = method if mixer is None else f"icl-{mixer}-{gq}"
            values = []
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                cmd = [sys.executable, "-m", "benches.demo_ablation", "--_child", method, mixer or "-", gq or "-",
                       str(seed), str(iterations), data, os.path.join(tmp, f"{name}-{seed}")]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    print(f"{name} seed {seed}: failed\n{proc.stderr[-2000:]}")
                    continue
                r = json.loads(line[0][7:])
                r.update(name=name, seed=seed, wall_s=time.perf_counter() - t0)
                runs.append(r)
                values.append(r)
                print(f"{name:<18} seed {seed}: corrupted {r['dice_corrupted']:.4f}  clean {r['dice_clean']:.4f}  "
                      f"{r['it_per_s']:.2f} it/s  {r['parameters']:,} params  {r['peak_rss']:.0f} MiB", flush=True)
            shape = f"task=mni-brain;iterations={iterations};seeds={len(values)}"
            for metric, unit in (("dice_corrupted", "fraction"), ("dice_clean", "fraction"), ("it_per_s", "it/s"),
                                 ("parameters", "count"), ("peak_rss", "MiB")):
                if values:
                    v = np.array([r[metric] for r in values], dtype=float)
                    rec.add(name, "fwd+bwd", shape, torch.float32, metric, unit,
                            (float(np.median(v)), float(v.min()), float(v.max())))
                else:
                    rec.add(name, "fwd+bwd", shape, torch.float32, metric, "error: every run failed")
    print()
    for name in dict.fromkeys(r["name"] for r in runs):
        sel = [r for r in runs if r["name"] == name]
        mean = lambda k: float(np.mean([r[k] for r in sel]))
        print(f"{name:<18} mean over {len(sel)} seed(s): corrupted {mean('dice_corrupted'):.4f}  "
              f"clean {mean('dice_clean'):.4f}  {mean('it_per_s'):.2f} it/s  params {int(mean('parameters')):,}  "
              f"peak RSS {mean('peak_rss'):.0f} MiB")
    rec.write_csv(args.csv)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(runs, fh, indent=2)


if __name__ == "__main__":
    main()
