"""Issue 12, classes 6 and 7 (and dataset.json from class 9), with real nibabel files: a label or a
second channel on another grid (spacing, origin, orientation) is refused naming the file; an
imagesTs case without a label is named in a one-line warning instead of silently leaving the test
metrics; a dataset.json of the wrong shape is one line naming it."""
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from icl.data import DataError, build_source, load_nifti_case, make_synthetic
from reliability_helpers import fingerprint, make_checkpoint, one_line_error, run

pytestmark = pytest.mark.usefixtures("one_thread")

PREP = {"layout": "nifti", "slice_axis": 2, "normalization": ["zscore", "zscore"], "target_spacing": None,
        "ct_window": [-175, 250], "file_ending": ".nii.gz"}


@pytest.fixture(scope="module")
def nifti(tmp_path_factory):
    base = tmp_path_factory.mktemp("nifti")
    return {"one": make_synthetic(str(base / "one"), "nifti", num_train=3, num_val=0, num_test=2, seed=0)["root"],
            "two": make_synthetic(str(base / "two"), "nifti", num_train=2, num_val=0, num_test=1, in_channels=2,
                                  seed=1)["root"]}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _reaffine(path, change):
    img = nib.load(path)
    aff = img.affine.copy()
    change(aff)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), path)


@pytest.mark.parametrize("what,change,needle", [
    ("spacing", lambda a: a.__setitem__((2, 2), 2.5), "voxel spacing (1.5, 1.5, 2.5) vs (1.5, 1.5, 2.0)"),
    ("origin", lambda a: a.__setitem__((0, 3), a[0, 3] + 3.0), "origin (-7.0, 5.0, 2.5) vs (-10.0, 5.0, 2.5)"),
    ("orientation", lambda a: a.__setitem__((0, 0), -a[0, 0]), "orientation"),
])
def test_label_on_another_grid_refused(nifti, tmp_path, capsys, what, change, needle):
    root = _copy(nifti["one"], tmp_path / "d")
    label = os.path.join(root, "labelsTr", "synth_001.nii.gz")
    _reaffine(label, change)
    with pytest.raises(DataError, match="label geometry differs"):
        load_nifti_case([os.path.join(root, "imagesTr", "synth_001_0000.nii.gz")], label, PREP | {"normalization": ["zscore"]})
    if what != "spacing":
        return
    out = tmp_path / "run"
    code, err = run(["train", "--dataset", "nifti", "--root", root, "--num-classes", "3", "--labeled-num", "2",
                     "--patch-size", "32", "32", "--batch-size", "2", "--labeled-bs", "1", "--max-iterations", "2",
                     "--no-progress", "--num-workers", "0", "--out", str(out)], capsys)
    one_line_error(code, err, label, needle)
    assert not os.path.exists(out / "checkpoints")


def test_label_within_tolerance_accepted(nifti, tmp_path):
    root = _copy(nifti["one"], tmp_path / "d")
    label = os.path.join(root, "labelsTr", "synth_001.nii.gz")
    _reaffine(label, lambda a: a.__setitem__((0, 3), a[0, 3] + 1e-4))  # float32 rounding noise
    case = load_nifti_case([os.path.join(root, "imagesTr", "synth_001_0000.nii.gz")], label,
                           PREP | {"normalization": ["zscore"]})
    assert case.label is not None


def test_second_channel_on_another_grid_refused(nifti, tmp_path, capsys):
    root = _copy(nifti["two"], tmp_path / "d")
    ch1 = os.path.join(root, "imagesTs", "synth_002_0001.nii.gz")
    _reaffine(ch1, lambda a: a.__setitem__((1, 3), a[1, 3] - 4.0))
    ck = make_checkpoint(tmp_path / "w.pt", num_classes=3, dataset="nifti", preprocessing=PREP)
    # make_checkpoint writes a 1-channel net: give it two input channels
    import torch

    from icl import checkpoint as C
    from icl.models import UNet2D

    c = torch.load(ck, weights_only=True)
    c["model"] = UNet2D(2, 3).state_dict()
    c["model_config"]["in_channels"] = 2
    C.save_atomic(c, ck)
    out = tmp_path / "pred"
    code, err = run(["predict", "--checkpoint", ck, os.path.join(root, "imagesTs"), "--out", str(out),
                     "--no-progress"], capsys)
    one_line_error(code, err, ch1, "geometry differs from channel 0", "origin")
    assert fingerprint(out) == {}


def test_unlabeled_test_case_named_in_one_line_warning(nifti, tmp_path, capsys):
    root = _copy(nifti["one"], tmp_path / "d")
    os.remove(os.path.join(root, "labelsTs", "synth_004.nii.gz"))
    with pytest.warns(UserWarning, match=r"1 of 2 imagesTs case\(s\) have no label .*: synth_004"):
        src = build_source("nifti", root, 3)
        assert src.cases("test") == ["synth_003"]
    ck = make_checkpoint(tmp_path / "w.pt", num_classes=3, dataset="nifti",
                         preprocessing=PREP | {"normalization": ["zscore"]})
    code, err = run(["evaluate", "--checkpoint", ck, "--root", root, "--out", str(tmp_path / "ev"),
                     "--no-progress"], capsys)
    assert code == 0, err
    warn = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warn) == 1 and warn[0].startswith("icl evaluate: warning:") and "synth_004" in warn[0], err
    assert "warnings.warn" not in err
    assert "1 cases" in err


@pytest.mark.parametrize("content,needle", [
    ([1, 2, 3], "expected a JSON object"),
    ({"channel_names": {"a": "CT"}}, "must be channel numbers"),
    ({"channel_names": {"0": "CT", "2": "MR"}}, "without gaps"),
    ({"channel_names": ["CT"]}, "must map channel numbers to names"),
    ({"channel_names": {"0": "CT"}, "file_ending": 7}, "file_ending"),
])
def test_bad_dataset_json_is_one_line(nifti, tmp_path, capsys, content, needle):
    root = _copy(nifti["one"], tmp_path / "d")
    js = os.path.join(root, "dataset.json")
    with open(js, "w") as f:
        json.dump(content, f)
    code, err = run(["train", "--dataset", "nifti", "--root", root, "--num-classes", "3", "--labeled-num", "2",
                     "--patch-size", "32", "32", "--no-progress", "--num-workers", "0", "--out",
                     str(tmp_path / "run")], capsys)
    one_line_error(code, err, js, needle)


def test_nifti_header_declaring_an_enormous_image_names_the_reason(tmp_path):
    """Issue 23: a header that declares far more voxels than a case can have is refused before
    reading, with the shape and the size in the message (not an empty reason)."""
    import struct

    from icl.data.io import read_nifti

    path = tmp_path / "huge.nii"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), str(path))
    raw = bytearray(path.read_bytes())
    raw[40:56] = struct.pack("<8h", 3, 30000, 30000, 30000, 1, 1, 1, 1)  # dim[0..7] of the NIfTI-1 header
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as ei:
        read_nifti(str(path))
    msg = str(ei.value)
    assert "huge.nii" in msg and "(30000, 30000, 30000)" in msg and "GiB" in msg and "()" not in msg
