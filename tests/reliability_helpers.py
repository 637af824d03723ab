"""Shared helpers of the tests/test_reliability_*.py modules (issue 12): run the CLI,
check a one-line error, and fingerprint folders to prove nothing earlier was destroyed."""
import hashlib
import os
import subprocess
import sys

from icl.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a 2-iteration ICL run on a synthetic ACDC folder (append --root and --out)
TRAIN = ["train", "--dataset", "synthetic", "--num-classes", "4", "--labeled-num", "2", "--patch-size", "32", "32",
         "--batch-size", "4", "--labeled-bs", "2", "--max-iterations", "2", "--val-every", "0", "--no-progress",
         "--num-workers", "0", "--global-queries", "memory", "--no-test"]


def run(argv, capsys):
    """``icl ARGV`` in this process: (exit code, stderr)."""
    code = main(list(argv))
    return code, capsys.readouterr().err


def run_subprocess(argv, timeout=600, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "icl"] + list(argv), cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=timeout, **kw)


def one_line_error(code, err, *needles, exit_code=2):
    """Exit ``exit_code``, exactly one non-empty stderr line, no traceback, and every needle in it."""
    assert code == exit_code, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def fingerprint(folder):
    """{relative path: sha1} of every file under ``folder`` (empty if it does not exist)."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha1(fh.read()).hexdigest()
    return out


def make_checkpoint(path, num_classes=4, nan_key=None, dataset="synthetic", preprocessing=None):
    """A weights checkpoint of an untrained 2D supervised UNet (no training needed to test readers);
    ``nan_key``: a state-dict key whose first value is set to NaN."""
    import torch

    from icl import checkpoint as C
    from icl.models import UNet2D

    torch.manual_seed(0)
    state = UNet2D(1, num_classes).state_dict()
    if nan_key is not None:
        state[nan_key].view(-1)[0] = float("nan")
    mc = {"arch": "unet2d", "in_channels": 1, "num_classes": num_classes, "patch_size": [32, 32], "mixer": "conv",
          "global_queries": "batch", "faithful": False, "method": "supervised"}
    prep = preprocessing or {"layout": "acdc", "slice_axis": 0, "normalization": None, "target_spacing": None}
    ck = {"format": C.FORMAT, "version": C.VERSION, "kind": "weights", "model_config": mc,
          "data_config": {"dataset": dataset, "preprocessing": prep, "spacing": None},
          "config": {"seed": 0}, "model": state, "iteration": 0, "best": None, "val": []}
    C.save_atomic(ck, str(path))
    return str(path)
