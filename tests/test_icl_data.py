"""icl.data: layouts, labeled subsets, splits, sampler, augmentations, errors; icl.predict."""
import json
import os

import numpy as np
import pytest
import torch

from icl.data import (ACDC_PATIENTS_TO_SLICES, DataError, IntensityAugment, TrainAugment, TrainDataset,
                      TwoStreamBatchSampler, build_source, make_splits, make_synthetic, read_h5, write_h5)
from icl.data import preprocess as pp
from icl.data.transforms import bias_field, gaussian_noise, random_crop, random_gamma, resize, rot_flip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    base = tmp_path_factory.mktemp("synth")
    out = {}
    for layout in ("acdc", "la", "brats", "nifti"):
        kw = {"num_unlabeled": 2, "in_channels": 2} if layout == "nifti" else {}
        out[layout] = make_synthetic(str(base / layout), layout, seed=1, **kw)
    return out


# ------------------------------------------------------------------ layouts


def test_acdc_layout_and_slices(synth):
    info = synth["acdc"]
    root = info["root"]
    assert os.path.isfile(os.path.join(root, "data", "slices", "patient001_frame01_slice_1.h5"))
    src = build_source("synthetic", root, 4)
    assert src.layout == "acdc" and src.slice_axis == 0
    sp = make_splits(src, 2, labeled_num=2)
    # generic count for synthetic data: 2 patients x 4 slices
    assert sp.num_labeled == 8 and sp.labeled_cases == ["patient001_frame01", "patient002_frame01"]
    assert sp.val == info["val"] and sp.test == info["test"] and sp.val_origin == "list"
    img, lab = src.load_item(sp.items[0])
    assert img.shape == (1, 32, 32) and img.dtype == np.float32 and lab.dtype == np.int64
    case = src.load_case(sp.val[0])
    assert case.image.shape == (1, 4, 32, 32) and case.label.shape == (4, 32, 32) and case.spacing is None
    # 3D models use the volumes of train.list
    sp3 = make_splits(src, 3, labeled_num=2)
    assert [it.case for it in sp3.items[:2]] == info["train"][:2] and sp3.num_labeled == 2


def test_acdc_table(synth):
    src = build_source("acdc", synth["acdc"]["root"], 4)
    with pytest.raises(DataError, match=r"--labeled-num 5 is not in the ACDC table.*3->68.*140->1312"):
        make_splits(src, 2, labeled_num=5)
    # 3 patients -> 68 slices, more than this tiny set holds
    with pytest.raises(DataError, match="68 slices"):
        make_splits(src, 2, labeled_num=3)
    assert ACDC_PATIENTS_TO_SLICES == {3: 68, 7: 136, 14: 256, 21: 396, 28: 512, 35: 664, 140: 1312}
    sp = make_splits(src, 2, labeled_fraction=0.25)
    assert sp.num_labeled == 8  # first quarter of 32 slices


@pytest.mark.parametrize("layout", ["la", "brats"])
def test_volume_layouts(synth, layout, tmp_path):
    info = synth[layout]
    src = build_source("synthetic", info["root"], 2)
    sp = make_splits(src, 3, labeled_num=3, seed=5)
    assert sp.num_labeled == 3 and sp.labeled_cases == info["train"][:3]
    if layout == "la":  # no val list: drawn outside the labeled subset, recorded
        assert sp.val_origin.startswith("seeded") and len(sp.val) == 2
        assert not set(sp.val) & set(sp.labeled_cases)
        assert make_splits(src, 3, labeled_num=3, seed=5).val == sp.val
        sp.save(str(tmp_path / "splits.json"))
        rec = json.load(open(tmp_path / "splits.json"))
        assert rec["val"] == sp.val and rec["val_origin"].startswith("seeded")
    else:
        assert sp.val == info["val"]
    assert sp.test == info["test"]
    assert not {it.case for it in sp.items} & (set(sp.val) | set(sp.test))
    # 2D models cut the volumes along the last axis
    sp2 = make_splits(src, 2, labeled_num=1, seed=5)
    assert sp2.num_labeled == 16 and sp2.items[0].axis == 2
    img, lab = src.load_item(sp2.items[3])
    assert img.shape == (1, 16, 16) and lab.shape == (16, 16)
    frac = make_splits(src, 3, labeled_fraction=0.5, seed=5)
    assert frac.num_labeled == (5 if layout == "la" else 4)  # half of train.list (10 LA, 8 BraTS)


def test_nifti_layout(synth, tmp_path):
    info = synth["nifti"]
    src = build_source("nifti", info["root"], 3, target_spacing=(3.0, 3.0, 2.0), cache_dir=str(tmp_path / "c"))
    assert src.schemes == ["zscore", "zscore"]
    sp = make_splits(src, 3, labeled_num=2, seed=0)
    # unlabeled images (no file in labelsTr) come last and are never labeled
    assert [it.labeled for it in sp.items[-2:]] == [False, False]
    assert sp.test == info["test"] and sp.test_origin == "list" and sp.val_origin.startswith("seeded")
    img, lab = src.load_item(sp.items[0])
    assert img.shape == (2, 8, 8, 16) and lab.shape == (8, 8, 16)  # 16 * 1.5 / 3 = 8
    assert abs(float(img[0][img[0] != 0].mean())) < 0.2
    assert src.load_item(sp.items[-1])[1] is None
    case = src.load_case(sp.test[0])
    assert case.spacing == (1.5, 1.5, 2.0) and case.affine[0, 0] == 1.5
    assert case.label.shape == (16, 16, 16) and case.meta["original_shape"] == (16, 16, 16)
    assert case.image.shape == (2, 8, 8, 16)
    # evaluation cache: same arrays as reading the files
    src.prepare([sp.test[0]], progress=False, for_eval=True)
    cached = src.load_case(sp.test[0])
    assert cached.affine is None and cached.spacing == case.spacing
    assert np.array_equal(cached.image, case.image) and np.array_equal(cached.label, case.label)
    assert cached.meta["original_shape"] == (16, 16, 16)


def test_normalisation_schemes():
    x = np.array([[0.0, -1000.0, 100.0, 400.0]], dtype=np.float32)
    ct = pp.normalize(x, ["ct"])
    assert ct.min() >= 0 and ct.max() <= 1 and ct[0, 1] == 0 and ct[0, 3] == 1
    z = pp.normalize(np.array([[0, 1, 2, 3]], np.float32), ["zscore"])
    assert z[0, 0] == 0  # background kept
    p = pp.normalize(np.random.default_rng(0).normal(size=(1, 100)).astype(np.float32), ["percentile"])
    assert p.min() == 0 and p.max() == 1
    with pytest.raises(ValueError, match="unknown scheme"):
        pp.normalize(x, ["foo"])


# ------------------------------------------------------------------ errors


def test_errors_name_the_file(tmp_path):
    good = tmp_path / "good.h5"
    write_h5(str(good), np.zeros((8, 8)), np.array([[0, 1], [2, 3]]).repeat(4, 0).repeat(4, 1))
    with pytest.raises(DataError, match=r"good\.h5.*value 3 but num_classes is 3"):
        read_h5(str(good), 2, num_classes=3)
    with pytest.raises(DataError, match=r"missing\.h5: file not found"):
        read_h5(str(tmp_path / "missing.h5"), 2)
    bad = tmp_path / "corrupt.h5"
    bad.write_bytes(b"not an h5 file at all")
    with pytest.raises(DataError, match=r"corrupt\.h5: cannot read h5"):
        read_h5(str(bad), 2)
    nolab = tmp_path / "nolabel.h5"
    write_h5(str(nolab), np.zeros((8, 8)))
    with pytest.raises(DataError, match=r"nolabel\.h5: no 'label'"):
        read_h5(str(nolab), 2)
    with pytest.raises(DataError, match="not found"):
        build_source("acdc", str(tmp_path / "nope"), 4)
    with pytest.raises(DataError, match="unknown data set"):
        build_source("mnist", str(tmp_path), 4)


def test_bad_label_in_dataset_names_file(tmp_path):
    info = make_synthetic(str(tmp_path / "b"), "brats", num_train=3, num_val=1, num_test=1, num_classes=3)
    src = build_source("brats2019", info["root"], 2)  # labels go up to 2
    sp = make_splits(src, 3, labeled_num=1)
    ds = TrainDataset(src, sp.items, None)
    with pytest.raises(DataError, match=r"BraTS19_synth_000\.h5.*num_classes is 2"):
        ds[0]


# ------------------------------------------------------------------ sampler


def test_two_stream_sampler():
    lab, unl = list(range(5)), list(range(5, 20))
    s = TwoStreamBatchSampler(lab, unl, 4, 2, seed=3)
    b0 = s.batch(0)
    assert len(b0) == 4 and all(i < 5 for i, _ in b0[:2]) and all(i >= 5 for i, _ in b0[2:])
    keys = [k for step in range(10) for _, k in s.batch(step)]
    assert len(set(keys)) == len(keys)
    # every labeled index once per pass over the stream
    seen = [i for step in range(5) for i, _ in s.batch(step)[:2]]
    assert sorted(seen[:5]) == lab
    # resumable: a sampler started at step 7 yields what the first yields there
    it = iter(TwoStreamBatchSampler(lab, unl, 4, 2, seed=3, start_step=7, max_steps=9))
    assert next(it) == s.batch(7) and next(it) == s.batch(8)
    # data parallel: ranks take disjoint parts of one global stream
    r0 = TwoStreamBatchSampler(lab, unl, 4, 2, seed=3, rank=0, world_size=2)
    r1 = TwoStreamBatchSampler(lab, unl, 4, 2, seed=3, rank=1, world_size=2)
    one = TwoStreamBatchSampler(lab, unl, 8, 4, seed=3)
    for step in range(3):
        a, b = r0.batch(step), r1.batch(step)
        assert [i for i, _ in a[:2] + b[:2]] == [i for i, _ in one.batch(step)[:4]]
        assert not {k for _, k in a} & {k for _, k in b}
    # a labeled-only sampler (supervised baseline) gets the same labeled items and keys
    sup = TwoStreamBatchSampler(lab, [], 2, 2, seed=3)
    assert all(sup.batch(t) == s.batch(t)[:2] for t in range(6))
    with pytest.raises(ValueError, match="no unlabeled"):
        TwoStreamBatchSampler(lab, [], 4, 2)


def test_dataset_augmentation_is_keyed(synth):
    src = build_source("synthetic", synth["acdc"]["root"], 4)
    sp = make_splits(src, 2, labeled_num=2)
    aug = TrainAugment((32, 32), IntensityAugment.default())
    ds = TrainDataset(src, sp.items, aug, seed=0)
    a, b, c = ds[(3, 11)], ds[(3, 11)], ds[(3, 12)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert a["image"].shape == (1, 32, 32) and a["label"].dtype == torch.int64
    assert not torch.equal(a["image"], c["image"])


def test_transforms():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(2, 20, 12)).astype(np.float32)
    lab = (img[0] > 0).astype(np.int64)
    r, rl = resize(img, lab, (32, 32))
    assert r.shape == (2, 32, 32) and rl.shape == (32, 32) and set(np.unique(rl)) <= {0, 1}
    v = rng.normal(size=(1, 10, 10, 6)).astype(np.float32)
    vl = np.zeros((10, 10, 6), np.int64)
    c, cl = random_crop(v, vl, (8, 16, 4), rng)
    assert c.shape == (1, 8, 16, 4) and cl.shape == (8, 16, 4)
    f, fl = rot_flip(v, (v[0] > 0).astype(np.int64), rng)
    assert np.array_equal(fl, (f[0] > 0))
    for fn in (random_gamma, gaussian_noise, bias_field):
        out = fn(v, rng)
        assert out.shape == v.shape and np.isfinite(out).all()
    assert IntensityAugment.from_config("gamma,bias").gamma == 0.3
    assert IntensityAugment.from_config(None) is None
    with pytest.raises(ValueError, match="unknown"):
        IntensityAugment.from_config("blur")
    t3 = TrainAugment((8, 8, 8))
    a, al = t3(v, vl, rng)
    assert a.shape == (1, 8, 8, 8)


# ------------------------------------------------------------------ inference


def test_predict_2d_and_3d():
    from icl import predict
    from icl.models import UNet2D, UNet3D

    torch.manual_seed(0)
    net2 = UNet2D(1, 3).eval()
    vol = np.random.default_rng(0).normal(size=(3, 20, 24)).astype(np.float32)
    pred, probs = predict(net2, vol, patch_size=(32, 32), slice_axis=0, return_probs=True)
    assert pred.shape == (3, 20, 24) and probs.shape == (3, 3, 20, 24)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    # a slice of the volume alone gives the same labels
    assert np.array_equal(predict(net2, vol[1], patch_size=(32, 32)), pred[1])
    # slicing along another axis
    assert predict(net2, vol, patch_size=(32, 32), slice_axis=2).shape == (3, 20, 24)

    net3 = UNet3D(1, 2).eval()
    x = np.random.default_rng(1).normal(size=(32, 32, 16)).astype(np.float32)
    with torch.no_grad():
        full = net3(torch.from_numpy(x)[None, None]).argmax(1)[0].numpy()
    assert np.array_equal(predict(net3, x, patch_size=(32, 32, 16)), full)
    # larger volume: sliding window; smaller: padded and cropped back
    assert predict(net3, np.zeros((40, 33, 20), np.float32), patch_size=(32, 32, 16), overlap=0.5).shape == (40, 33, 20)
    assert predict(net3, np.zeros((20, 20, 10), np.float32), patch_size=(32, 32, 16)).shape == (20, 20, 10)
    with pytest.raises(ValueError, match="channel"):
        predict(net3, np.zeros((2, 32, 32, 16), np.float32), patch_size=(32, 32, 16))


def test_nifti_decathlon_names_and_file_lists(tmp_path):
    """One-channel data named <case>.nii.gz (AMOS, Decathlon) and lists that name files."""
    from icl.data import write_nifti

    rng = np.random.default_rng(0)
    for i in (16, 405, 214, 159):
        img = rng.normal(size=(8, 8, 4)).astype(np.float32) * 100
        write_nifti(str(tmp_path / "imagesTr" / f"amos_{i:04d}.nii.gz"), img, np.eye(4))
        write_nifti(str(tmp_path / "labelsTr" / f"amos_{i:04d}.nii.gz"), (img > 0).astype(np.uint8), np.eye(4))
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "bg", "1": "fg"}}))
    (tmp_path / "train.list").write_text("amos_0016.nii.gz\namos_0405.nii.gz\namos_0214.nii.gz\n")
    (tmp_path / "val.list").write_text("amos_0159.nii.gz\n")
    src = build_source("nifti", str(tmp_path), 2, cache_dir=str(tmp_path / "cache"))
    assert src.schemes == ["ct"] and src.cases("train") == ["amos_0016", "amos_0405", "amos_0214"]
    sp = make_splits(src, 3, labeled_num=1, test_fraction=0.3)
    assert sp.labeled_cases == ["amos_0016"] and sp.val == ["amos_0159"] and len(sp.test) == 1
    case = src.load_case("amos_0159")
    assert case.image.shape == (1, 8, 8, 4) and 0.0 <= case.image.min() and case.image.max() <= 1.0
