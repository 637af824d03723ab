"""Tests of icl.metrics (medpy is the oracle)."""
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from icl.metrics import asd, dice, evaluate_case, hd95, jaccard, summarize

medpy = pytest.importorskip("medpy.metric.binary")


def _blobs(shape, seed, threshold=0.55):
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random(shape), sigma=2)
    return smooth > np.quantile(smooth, threshold)


CASES = [
    ((40, 36), None),
    ((40, 36), (0.7, 1.9)),
    ((14, 16, 12), None),
    ((14, 16, 12), (2.5, 0.8, 1.0)),
]


@pytest.mark.parametrize("shape,spacing", CASES)
def test_parity_with_medpy(shape, spacing):
    for seed in range(3):
        p, g = _blobs(shape, seed), _blobs(shape, seed + 100)
        assert math.isclose(dice(p, g), medpy.dc(p, g), rel_tol=1e-12)
        assert math.isclose(jaccard(p, g), medpy.jc(p, g), rel_tol=1e-12)
        assert math.isclose(hd95(p, g, spacing), medpy.hd95(p, g, voxelspacing=spacing), rel_tol=1e-9)
        assert math.isclose(asd(p, g, spacing), medpy.asd(p, g, voxelspacing=spacing), rel_tol=1e-9)
        assert math.isclose(asd(g, p, spacing), medpy.asd(g, p, voxelspacing=spacing), rel_tol=1e-9)


def test_parity_random_noise_and_torch_inputs():
    rng = np.random.default_rng(7)
    p, g = rng.random((20, 24)) > 0.6, rng.random((20, 24)) > 0.5
    tp, tg = torch.from_numpy(p.astype(np.uint8)), torch.from_numpy(g)
    assert math.isclose(dice(tp, tg), medpy.dc(p, g), rel_tol=1e-12)
    assert math.isclose(hd95(tp, tg), medpy.hd95(p, g), rel_tol=1e-9)
    assert math.isclose(asd(tp, tg, 1.5), medpy.asd(p, g, voxelspacing=1.5), rel_tol=1e-9)


def test_empty_masks():
    z = np.zeros((10, 20), bool)
    m = z.copy()
    m[2:5, 3:9] = True
    # both empty: perfect
    assert dice(z, z) == 1.0 and jaccard(z, z) == 1.0 and hd95(z, z) == 0.0 and asd(z, z) == 0.0
    # one empty: dice 0, distances = image diagonal (spacing-aware) or NaN
    diag = math.hypot(10, 20)
    for a, b in ((m, z), (z, m)):
        assert dice(a, b) == 0.0 and jaccard(a, b) == 0.0
        assert math.isclose(hd95(a, b), diag) and math.isclose(asd(a, b), diag)
        assert math.isnan(hd95(a, b, on_empty="nan")) and math.isnan(asd(a, b, on_empty="nan"))
    assert math.isclose(hd95(m, z, spacing=(2.0, 0.5)), math.hypot(20, 10))
    # identical non-empty masks
    assert dice(m, m) == 1.0 and hd95(m, m) == 0.0 and asd(m, m) == 0.0
    with pytest.raises(ValueError):
        dice(m, m[:5])


def test_evaluate_case_and_summarize():
    gt = np.zeros((3, 16, 16), np.int64)
    gt[:, 2:8, 2:8] = 1
    gt[:, 10:14, 9:15] = 2
    pred = gt.copy()
    pred[:, 10:14, 9:15] = 0  # class 2 missed entirely
    pred[:, 2:8, 2:9] = 1
    case = evaluate_case(pred, gt, 4, spacing=(2.0, 1.0, 1.0))
    assert set(case) == {1, 2, 3}
    p1, g1 = pred == 1, gt == 1
    assert math.isclose(case[1]["dice"], medpy.dc(p1, g1))
    assert math.isclose(case[1]["hd95"], medpy.hd95(p1, g1, voxelspacing=(2.0, 1.0, 1.0)))
    assert case[2]["dice"] == 0.0 and math.isclose(case[2]["hd95"], math.sqrt(6 ** 2 + 16 ** 2 + 16 ** 2))
    assert case[3] == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}  # absent in both
    perfect = evaluate_case(torch.from_numpy(gt), torch.from_numpy(gt), 4)
    s = summarize([case, perfect])
    assert s["num_cases"] == 2
    assert math.isclose(s["per_class"][1]["dice"], (case[1]["dice"] + 1.0) / 2)
    assert math.isclose(s["per_class"][2]["dice"], 0.5)
    assert math.isclose(s["mean"]["dice"], np.mean([s["per_class"][c]["dice"] for c in (1, 2, 3)]))
    nan_case = evaluate_case(pred, gt, 3, on_empty="nan")
    s = summarize([nan_case, evaluate_case(gt, gt, 3)])
    assert s["per_class"][2]["hd95"] == 0.0  # NaN skipped
