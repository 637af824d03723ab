"""The lesion population (icl.demo.lesions): one contrast family, lesions aligned with the
images, training slices listed subject by subject so --labeled-num counts subjects."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("nilearn", reason="the population is built from the template in the nilearn wheel")
h5py = pytest.importorskip("h5py")

from icl.demo.lesions import LesionSpec, build_lesion_population  # noqa: E402

SPEC = dict(size=32, train_subjects=4, train_slices=3, val_subjects=2, test_subjects=2, eval_slices=4, seed=3)


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lesions"))
    return root, build_lesion_population(root, LesionSpec(**SPEC), log=lambda *_: None)


def test_layout_labels_and_one_contrast_family(population):
    root, meta = population
    assert meta["counts"] == {"train_slices": 12, "train": 4, "val": 2, "test": 2}
    with open(os.path.join(root, "train_slices.list")) as fh:
        names = fh.read().split()
    assert [n.split("_")[0] for n in names] == [f"sub{i:03d}" for i in range(4) for _ in range(3)]
    lesion_pixels = 0
    for n in names:
        with h5py.File(os.path.join(root, "data", "slices", n + ".h5")) as f:
            img, lab = f["image"][:], f["label"][:]
        assert img.shape == lab.shape == (32, 32) and img.dtype == np.float32
        assert set(np.unique(lab)) <= {0, 1}
        assert (img[lab == 1] > 0).all()  # lesions lie inside the head
        lesion_pixels += int(lab.sum())
    assert lesion_pixels > 0
    with h5py.File(os.path.join(root, "data", "sub006.h5")) as f:
        assert f["image"].shape == f["label"].shape == (4, 32, 32)
    assert {s["contrast"] for s in meta["subjects"]} == {"t1"}
    assert all(len(s["lesions"]) == (3 if s["role"] == "train" else 4) for s in meta["subjects"])


def test_reused_when_unchanged_rebuilt_when_changed(population, tmp_path):
    root, meta = population
    stamp = os.path.getmtime(os.path.join(root, "meta.json"))
    again = build_lesion_population(root, LesionSpec(**SPEC), log=lambda *_: None)
    assert again == json.load(open(os.path.join(root, "meta.json"))) and os.path.getmtime(
        os.path.join(root, "meta.json")) == stamp
    other = build_lesion_population(str(tmp_path), LesionSpec(**dict(SPEC, seed=4)), log=lambda *_: None)
    assert other["subjects"][0]["lesion_profile"] != meta["subjects"][0]["lesion_profile"] or \
        other["subjects"][0]["lesions"] != meta["subjects"][0]["lesions"]


def test_labeled_num_counts_subjects(population):
    from icl.data.sources import build_source

    root, _ = population
    src = build_source("synthetic", root, num_classes=2)
    items = src.train_items(2)
    assert src.labeled_count(items, 1, 2) == 3 and src.labeled_count(items, 3, 2) == 9


@pytest.mark.parametrize("bad,match", [(dict(size=40), "multiple of 16"), (dict(train_subjects=0), "train_subjects"),
                                       (dict(min_radius=5.0, max_radius=2.0), "radii")])
def test_bad_spec_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        LesionSpec(**dict(SPEC, **bad)).validate()
