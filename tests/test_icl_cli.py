"""The ``icl`` command line: bad arguments, config files, train/evaluate/predict/export."""
import json
import os
import subprocess
import sys

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

import icl_kernels
from icl.cli import main
from icl.data import make_synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GQ = "memory"  # the default global queries (PrototypeMemory)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    return {
        "acdc": make_synthetic(str(base / "acdc"), "acdc", num_train=4, seed=0)["root"],
        "nifti": make_synthetic(str(base / "nifti"), "nifti", num_train=4, shape=(32, 32, 16), seed=1)["root"],
    }


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def _one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


BASE = ["train", "--num-classes", "4", "--batch-size", "4", "--labeled-bs", "2", "--max-iterations", "2",
        "--no-progress", "--num-workers", "0"]


def test_bad_arguments(roots, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    code, err = _run(BASE + out + ["--dataset", "acdc", "--root", str(tmp_path / "missing"), "--labeled-num", "3",
                                   "--patch-size", "32", "32"], capsys)
    _one_line_error(code, err, "--root", "missing", "not found")
    code, err = _run(BASE + out + ["--dataset", "acdc", "--root", roots["acdc"], "--labeled-num", "4",
                                   "--patch-size", "32", "32"], capsys)
    _one_line_error(code, err, "--labeled-num 4", "3->68", "140->1312")
    code, err = _run(BASE + out + ["--dataset", "acdc", "--root", roots["acdc"], "--labeled-num", "3",
                                   "--patch-size", "40", "40"], capsys)
    _one_line_error(code, err, "--patch-size 40 40", "multiple of 16")
    code, err = _run(BASE + out + ["--dataset", "mnist", "--root", roots["acdc"], "--labeled-num", "3",
                                   "--patch-size", "32", "32"], capsys)
    _one_line_error(code, err, "--dataset 'mnist'", "acdc, la, brats2019, nifti, synthetic")
    with pytest.raises(SystemExit) as ei:  # argparse mistakes: one line too
        main(["train", "--batch-size", "four"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "invalid int value" in err
    code, err = _run(["evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--root", roots["acdc"],
                      "--out", str(tmp_path / "e")], capsys)
    _one_line_error(code, err, "nope.pt", "not found")
    with pytest.raises(SystemExit) as ei:
        main(["train", "--loss-weights", "pseudo=0,consistency"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'consistency'" in err and "TERM=WEIGHT" in err
    code, err = _run(BASE + out + ["--dataset", "acdc", "--root", roots["acdc"], "--labeled-num", "3",
                                   "--patch-size", "32", "32", "--loss-weights", "pseudo=0,bogus=1"], capsys)
    _one_line_error(code, err, "loss_weights", "'bogus'")
    from icl.cli import _loss_weights
    assert _loss_weights("pseudo=0, consistency=12.5") == {"pseudo": 0.0, "consistency": 12.5}
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    code, err = _run(BASE + out + ["--config", str(bad)], capsys)
    _one_line_error(code, err, "bad.yaml", "learning_rate")


def test_subprocess_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "icl", "train", "--dataset", "acdc", "--root", str(tmp_path / "x"),
                        "--num-classes", "4", "--labeled-num", "3", "--patch-size", "32", "32", "--out",
                        str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("icl train: error: --root")


def test_train_evaluate_predict_export_2d(roots, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"dataset: synthetic\nroot: {roots['acdc']}\nnum_classes: 4\nlabeled_num: 2\npatch_size: [32, 32]\n"
        f"batch_size: 4\nlabeled_bs: 2\nmax_iterations: 50\nval_every: 2\nglobal_queries: {GQ}\nseed: 3\n"
    )
    out = tmp_path / "run"
    code, err = _run(["train", "--config", str(cfg), "--max-iterations", "4", "--labeled-fraction", "0.5",
                      "--out", str(out), "--no-progress", "--num-workers", "0"], capsys)
    assert code == 0, err
    m = json.load(open(out / "metrics.json"))
    # flags override the file; a labeled flag replaces the file's labeled option
    assert m["config"]["max_iterations"] == 4 and m["config"]["seed"] == 3
    assert m["config"]["labeled_num"] is None and m["config"]["labeled_fraction"] == 0.5
    assert len(m["val"]) == 2 and "test" in m and "Dice" in err

    code, err = _run(["evaluate", "--checkpoint", str(out / "checkpoints" / "best.pt"), "--root", roots["acdc"],
                      "--split", "test", "--out", str(tmp_path / "ev"), "--no-progress"], capsys)
    assert code == 0, err
    summ = json.load(open(tmp_path / "ev" / "test_summary.json"))
    assert abs(summ["mean"]["dice"] - m["test"]["mean"]["dice"]) < 1e-9
    assert (tmp_path / "ev" / "test_cases.csv").read_text().startswith("case,class,dice,jaccard,hd95,asd")
    code, err = _run(["evaluate", "--checkpoint", str(out / "checkpoints" / "best.pt"), "--root", roots["acdc"],
                      "--num-classes", "3", "--out", str(tmp_path / "ev2")], capsys)
    _one_line_error(code, err, "num_classes=4 in the checkpoint but 3 here")

    vol = os.path.join(roots["acdc"], "data", "patient005_frame01.h5")
    code, err = _run(["predict", "--checkpoint", str(out / "checkpoints" / "last.pt"), vol, "--out",
                      str(tmp_path / "pred"), "--no-progress"], capsys)
    assert code == 0, err
    with h5py.File(tmp_path / "pred" / "patient005_frame01.h5") as f, h5py.File(vol) as g:
        assert f["label"].shape == g["label"].shape and f["label"].dtype == np.uint8

    code, err = _run(["export", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--out",
                      str(tmp_path / "unet.pt")], capsys)
    assert code == 0, err
    from icl.models import UNet2D

    UNet2D(1, 4).load_state_dict(torch.load(tmp_path / "unet.pt", weights_only=True))
    # the export predicts like the checkpoint
    code, err = _run(["predict", "--checkpoint", str(tmp_path / "unet.pt"), vol, "--out", str(tmp_path / "pred2"),
                      "--no-progress"], capsys)
    assert code == 0, err
    with h5py.File(tmp_path / "pred" / "patient005_frame01.h5") as a, \
            h5py.File(tmp_path / "pred2" / "patient005_frame01.h5") as b:
        assert np.array_equal(a["label"][()], b["label"][()])


def test_nifti_predict_keeps_geometry(roots, tmp_path, capsys):
    out = tmp_path / "n"
    code, err = _run(["train", "--dataset", "nifti", "--root", roots["nifti"], "--num-classes", "3",
                      "--labeled-num", "2", "--patch-size", "32", "32", "16", "--batch-size", "2", "--labeled-bs", "1",
                      "--max-iterations", "2", "--val-every", "0", "--no-test", "--target-spacing", "2", "2", "2",
                      "--global-queries", GQ, "--out", str(out), "--no-progress", "--num-workers", "0"], capsys)
    assert code == 0, err
    src = os.path.join(roots["nifti"], "imagesTs", "synth_006_0000.nii.gz")
    code, err = _run(["predict", "--checkpoint", str(out / "checkpoints" / "last.pt"), src, "--out",
                      str(tmp_path / "p"), "--no-progress"], capsys)
    assert code == 0, err
    a, b = nib.load(src), nib.load(tmp_path / "p" / "synth_006.nii.gz")
    assert a.shape == b.shape and np.allclose(a.affine, b.affine)
    assert np.allclose(a.header.get_zooms(), b.header.get_zooms()) and b.get_data_dtype() == np.uint8


def test_sigterm_writes_checkpoint_and_resume_finishes(roots, tmp_path):
    import signal
    import time

    out = tmp_path / "sig"
    cmd = [sys.executable, "-m", "icl", "train", "--dataset", "synthetic", "--root", roots["acdc"],
           "--num-classes", "4", "--labeled-num", "2", "--patch-size", "32", "32", "--batch-size", "4",
           "--labeled-bs", "2", "--max-iterations", "100000", "--val-every", "0", "--save-every", "0",
           "--global-queries", GQ, "--out", str(out), "--no-progress", "--num-workers", "0", "--no-test"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            log = out / "log.csv"
            if log.is_file() and len(log.read_text().splitlines()) > 3:
                break
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err
    assert "interrupted at iteration" in err and "--resume" in err
    it = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["iteration"]
    assert it >= 3
    # continue to a shorter end point: the schedule follows the new --max-iterations
    r = subprocess.run(cmd[:cmd.index("--max-iterations") + 1] + [str(it + 2)] + cmd[cmd.index("--max-iterations") + 2:]
                       + ["--resume"], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = (out / "log.csv").read_text().splitlines()
    assert len(rows) == it + 3  # header + it + 2 rows, nothing duplicated
