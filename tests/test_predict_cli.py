"""``icl predict`` / ``icl evaluate``: window options, mirroring, ensembles, saved probabilities."""
import json
import os

import nibabel as nib
import numpy as np
import pytest

from icl.cli import main
from icl.data import make_synthetic

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def _one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("predict")
    root = make_synthetic(str(base / "nifti"), "nifti", num_train=4, shape=(32, 32, 16), seed=1)["root"]
    ckpts = {}
    for name, patch in (("a", ("32", "16", "16")), ("b", ("32", "16", "16")), ("c", ("32", "32", "16"))):
        out = base / name
        code = main(["train", "--dataset", "nifti", "--root", root, "--num-classes", "3", "--labeled-num", "2",
                     "--patch-size", *patch, "--batch-size", "2", "--labeled-bs", "1", "--max-iterations", "2",
                     "--val-every", "0", "--no-test", "--target-spacing", "2", "2", "1.5", "--out", str(out),
                     "--no-progress", "--num-workers", "0", "--seed", str(ord(name))])
        assert code == 0
        ckpts[name] = str(out / "checkpoints" / "last.pt")
    return {"root": root, **ckpts, "src": os.path.join(root, "imagesTs", "synth_006_0000.nii.gz")}


def test_saved_probabilities_match_the_labels_and_geometry(runs, tmp_path, capsys):
    out = tmp_path / "p"
    code, err = _run(["predict", "--checkpoint", runs["a"], runs["src"], "--out", str(out), "--no-progress",
                      "--save-probabilities", "--window-weighting", "gaussian", "--overlap", "0.5", "0.5", "0.25"],
                     capsys)
    assert code == 0, err
    a, b = nib.load(runs["src"]), nib.load(out / "synth_006.nii.gz")
    assert a.shape == b.shape and np.allclose(a.affine, b.affine)
    assert np.allclose(a.header.get_zooms(), b.header.get_zooms())
    assert nib.aff2axcodes(a.affine) == nib.aff2axcodes(b.affine)
    with np.load(out / "synth_006.npz") as z:
        probs, affine = z["probabilities"], z["affine"]
    assert probs.dtype == np.float16 and probs.shape == (3,) + a.shape  # on the input's grid
    np.testing.assert_allclose(affine, a.affine)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=3e-3)
    labels = np.asarray(b.dataobj)
    am = probs.argmax(0)
    top2 = np.sort(probs.astype(np.float32), axis=0)[-2:]
    # float16 rounding may flip the argmax only where the two best classes are within its resolution
    assert ((am == labels) | (top2[1] - top2[0] <= 2e-3)).all()
    code, err = _run(["predict", "--checkpoint", runs["a"], runs["src"], "--out", str(tmp_path / "p32"),
                      "--no-progress", "--save-probabilities", "--probabilities-dtype", "float32",
                      "--window-weighting", "gaussian",
                      "--overlap", "0.5", "0.5", "0.25"], capsys)
    assert code == 0, err
    with np.load(tmp_path / "p32" / "synth_006.npz") as z:
        p32 = z["probabilities"]
    assert p32.dtype == np.float32 and np.array_equal(p32.argmax(0), labels)
    np.testing.assert_allclose(p32.sum(0), 1.0, atol=1e-5)


def test_ensemble_and_mirroring(runs, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _run(["predict", "--checkpoint", runs["a"], runs["src"], "--out", str(one), "--no-progress",
                 "--save-probabilities", "--probabilities-dtype", "float32"], capsys)[0] == 0
    code, err = _run(["predict", "--checkpoint", runs["a"], runs["a"], runs["src"], "--out", str(two),
                      "--no-progress", "--save-probabilities", "--probabilities-dtype", "float32"], capsys)
    assert code == 0, err
    with np.load(one / "synth_006.npz") as x, np.load(two / "synth_006.npz") as y:
        np.testing.assert_allclose(x["probabilities"], y["probabilities"], atol=1e-6)
    # two different members: the mean of their probabilities
    code, err = _run(["predict", "--checkpoint", runs["b"], "--out", str(tmp_path / "b"), runs["src"],
                      "--no-progress", "--save-probabilities", "--probabilities-dtype", "float32"], capsys)
    assert code == 0, err
    code, err = _run(["predict", "--checkpoint", runs["a"], "--checkpoint", runs["b"], "--out", str(tmp_path / "ab"),
                      runs["src"], "--no-progress", "--save-probabilities", "--probabilities-dtype", "float32"], capsys)
    assert code == 0, err
    with np.load(one / "synth_006.npz") as x, np.load(tmp_path / "b" / "synth_006.npz") as y, \
            np.load(tmp_path / "ab" / "synth_006.npz") as z:
        # resampling is linear, so the mean of the resampled members is the resampled mean
        np.testing.assert_allclose(z["probabilities"], (x["probabilities"] + y["probabilities"]) / 2, atol=1e-5)
    code, err = _run(["predict", "--checkpoint", runs["a"], runs["src"], "--out", str(tmp_path / "t"),
                      "--no-progress", "--tta", "flip", "--sw-batch-size", "1"], capsys)
    assert code == 0, err
    code, err = _run(["predict", "--checkpoint", runs["a"], runs["c"], runs["src"], "--out", str(tmp_path / "x")],
                     capsys)
    _one_line_error(code, err, runs["a"], runs["c"], "patch_size", "[32, 16, 16] vs [32, 32, 16]")


def test_evaluate_takes_the_same_options(runs, tmp_path, capsys):
    base = ["evaluate", "--root", runs["root"], "--split", "val", "--no-progress"]
    code, err = _run(base + ["--checkpoint", runs["a"], "--out", str(tmp_path / "e1")], capsys)
    assert code == 0, err
    code, err = _run(base + ["--checkpoint", runs["a"], runs["a"], "--out", str(tmp_path / "e2")], capsys)
    assert code == 0, err
    d1 = json.load(open(tmp_path / "e1" / "val_summary.json"))
    d2 = json.load(open(tmp_path / "e2" / "val_summary.json"))
    assert d1["mean"]["dice"] == pytest.approx(d2["mean"]["dice"], abs=1e-9)
    code, err = _run(base + ["--checkpoint", runs["a"], "--out", str(tmp_path / "e3"),
                             "--window-preset", "published-amos", "--tta", "flip"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("flags,needles", [
    (["--overlap", "1.0"], ["--overlap", "[0, 1)"]),
    (["--overlap", "0.5", "0.5"], ["--overlap 0.5 0.5", "1 value or 3"]),
    (["--stride", "0"], ["--stride", "positive"]),
    (["--overlap", "0.5", "--stride", "8"], ["--overlap and --stride"]),
    (["--window-preset", "published-brats", "--overlap", "0.5"], ["--window-preset published-brats", "--overlap"]),
    (["--sw-batch-size", "0"], ["--sw-batch-size"]),
])
def test_bad_window_options(runs, tmp_path, capsys, flags, needles):
    code, err = _run(["predict", "--checkpoint", runs["a"], runs["src"], "--out", str(tmp_path / "o")] + flags, capsys)
    _one_line_error(code, err, *needles)


def test_oblique_input_keeps_affine_orientation_and_header(runs, tmp_path, capsys):
    """An oblique, flipped (LPS-like) input with its own header fields: the label and the
    probabilities come back on its grid, with its affine, orientation, zooms and units."""
    src = nib.load(runs["src"])
    c, s_ = np.cos(0.3), np.sin(0.3)
    rot = np.array([[-c, -s_, 0], [s_, -c, 0], [0, 0, 1.0]]) @ np.diag([1.5, 1.5, 2.0])
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = rot, [40.0, -12.0, 7.5]
    img = nib.Nifti1Image(np.asarray(src.dataobj, dtype=np.float32), affine)
    img.header["descrip"] = b"oblique test"
    img.header.set_xyzt_units("mm", "sec")
    (tmp_path / "in").mkdir()
    path = str(tmp_path / "in" / "obl.nii.gz")
    nib.save(img, path)
    code, err = _run(["predict", "--checkpoint", runs["a"], path, "--out", str(tmp_path / "o"), "--no-progress",
                      "--save-probabilities"], capsys)
    assert code == 0, err
    a, b = nib.load(path), nib.load(tmp_path / "o" / "obl.nii.gz")
    assert a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-5)
    assert nib.aff2axcodes(b.affine) == nib.aff2axcodes(affine) and np.allclose(b.header.get_zooms(), (1.5, 1.5, 2.0))
    assert b.header["descrip"].tobytes().rstrip(b"\0") == b"oblique test"
    assert b.header.get_xyzt_units() == ("mm", "sec")
    with np.load(tmp_path / "o" / "obl.npz") as z:
        assert z["probabilities"].shape == (3,) + a.shape and np.allclose(z["affine"], a.affine, atol=1e-5)
