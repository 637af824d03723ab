"""Prediction: sliding windows (against MONAI and the published stride loop), Gaussian weights,
test-time mirroring, ensembles, probabilities resampled to the source grid, the published
integer rotation angles."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from icl.data import preprocess as pp
from icl.data.transforms import TrainAugment, rotate
from icl.inference import (argmax_resampled, gaussian_weights, predict, resample_probabilities, sliding_window,
                           window_predictor, window_starts, window_steps)

pytestmark = pytest.mark.usefixtures("one_thread")

try:
    from monai.inferers import sliding_window_inference
    from monai.data.utils import compute_importance_map
except Exception:  # pragma: no cover - monai is optional
    sliding_window_inference = None

needs_monai = pytest.mark.skipif(sliding_window_inference is None, reason="monai is not installed")


class _PositionNet(torch.nn.Module):
    """A predictor whose output depends on where a voxel lies in its window (a zero-padded
    conv plus a window-relative ramp): blending differs with any change of placement."""

    def __init__(self, cin=2, k=3, dims=3, dtype=torch.float64, patch=(8, 8, 8)):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
        self.c = conv(cin, k, 3, padding=1).to(dtype)
        with torch.no_grad():
            for p in self.c.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
        self.ramp = torch.randn((1, k) + tuple(patch), generator=g, dtype=dtype)
        self.in_channels = cin

    def forward(self, x):
        return self.c(x) + self.ramp


def _blend(net, x, patch, overlap, weighting, bs=3):
    return sliding_window(net, x, patch, window_steps(patch, overlap), weighting, bs)


# ------------------------------------------------------------------ placement and blending

@needs_monai
@pytest.mark.parametrize("weighting", ["constant", "gaussian"])
@pytest.mark.parametrize("shape,overlap", [
    ((23, 17, 11), 0.5), ((23, 17, 11), 0.25), ((19, 12, 30), (0.8, 0.6, 0.5)), ((16, 9, 13), 0.0),
    ((5, 7, 6), 0.5),           # smaller than the window on every axis: padded, cropped back
    ((5, 20, 8), (0.3, 0.7, 0.1)),  # smaller on one axis, equal on another
])
def test_sliding_window_equals_monai(shape, overlap, weighting):
    patch = (8, 8, 8)
    net = _PositionNet(patch=patch)
    x = torch.randn((2,) + shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = _blend(net, x, patch, overlap, weighting)
    want = sliding_window_inference(x[None], patch, 3, net, overlap=overlap, mode=weighting)[0]
    assert got.shape == want.shape == (3,) + shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@needs_monai
@pytest.mark.parametrize("patch", [(8, 8, 8), (7, 10, 5), (96, 96, 96)])
def test_gaussian_weights_equal_monai(patch):
    got = gaussian_weights(patch, 0.125)
    want = compute_importance_map(patch, mode="gaussian", sigma_scale=0.125)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert float(got.min()) >= 1e-3 and float(got.max()) <= 1.0


def _published_loop(net, image, stride_xy, stride_z, patch, K):
    """An independent transcription of the published stride loop (val_3D.py / test_3D_BraTS.py):
    zero-pad to the patch (centred), ceil((n - p) / s) + 1 windows at min(s * i, n - p), softmax
    probabilities summed and divided by the window count, crop."""
    w, h, d = image.shape
    pw, ph, pd = (max(0, p - n) for p, n in zip(patch, (w, h, d)))
    padw, padh, padd = (pw // 2, pw - pw // 2), (ph // 2, ph - ph // 2), (pd // 2, pd - pd // 2)
    image = np.pad(image, [padw, padh, padd])
    ww, hh, dd = image.shape
    sx = math.ceil((ww - patch[0]) / stride_xy) + 1
    sy = math.ceil((hh - patch[1]) / stride_xy) + 1
    sz = math.ceil((dd - patch[2]) / stride_z) + 1
    score = np.zeros((K,) + image.shape)
    cnt = np.zeros(image.shape)
    for ix in range(sx):
        xs = min(stride_xy * ix, ww - patch[0])
        for iy in range(sy):
            ys = min(stride_xy * iy, hh - patch[1])
            for iz in range(sz):
                zs = min(stride_z * iz, dd - patch[2])
                t = torch.from_numpy(image[xs:xs + patch[0], ys:ys + patch[1], zs:zs + patch[2]])[None, None]
                with torch.no_grad():
                    y = torch.softmax(net(t), 1)[0].numpy()
                score[:, xs:xs + patch[0], ys:ys + patch[1], zs:zs + patch[2]] += y
                cnt[xs:xs + patch[0], ys:ys + patch[1], zs:zs + patch[2]] += 1
    score = score / cnt[None]
    return score[:, padw[0]:padw[0] + w, padh[0]:padh[0] + h, padd[0]:padd[0] + d]


@pytest.mark.parametrize("shape,strides", [((30, 25, 14), (6, 4)), ((21, 9, 17), (5, 3)), ((8, 8, 8), (3, 3))])
def test_stride_placement_is_the_published_loop(shape, strides):
    patch = (8, 8, 8)
    net = _PositionNet(cin=1, patch=patch)
    img = np.random.default_rng(2).normal(size=shape)
    want = _published_loop(net, img, strides[0], strides[1], patch, 3)
    fn = window_predictor([net], torch.device("cpu"))
    steps = window_steps(patch, stride=(strides[0], strides[0], strides[1]))
    got = sliding_window(fn, torch.from_numpy(img)[None], patch, steps, "constant", 4)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


def test_window_steps_and_starts():
    assert window_steps((96, 96, 96), 0.5) == (48, 48, 48)
    assert window_steps((96, 96, 96), (0.25, 0.5, 0.8)) == (72, 48, 19)  # floor, as MONAI
    assert window_steps((112, 112, 80), stride=(18, 18, 4)) == (18, 18, 4)
    assert window_steps((10, 10, 10), 0.99) == (1, 1, 1)
    assert window_starts(10, 10, 3) == [0] and window_starts(5, 10, 3) == [0]
    assert window_starts(20, 8, 5) == [0, 5, 10, 12]
    with pytest.raises(ValueError, match="overlap"):
        window_steps((8, 8, 8), 1.0)
    with pytest.raises(ValueError, match="1 or 3"):
        window_steps((8, 8, 8), (0.5, 0.5))
    with pytest.raises(ValueError, match="stride"):
        window_steps((8, 8, 8), stride=0)


def test_predict_windows_logits_and_batches():
    """predict's 3D path: float32 windows, any sw batch size gives the same; blend='logits'
    is the softmax of the blended logits (MONAI over the raw network, as the published AMOS test)."""
    patch = (8, 8, 8)
    net = _PositionNet(cin=1, dtype=torch.float32, patch=patch)
    vol = np.random.default_rng(3).normal(size=(19, 13, 10)).astype(np.float32)
    _, p1 = predict(net, vol, patch_size=patch, overlap=0.5, sw_batch_size=1, return_probs=True)
    _, p7 = predict(net, vol, patch_size=patch, overlap=0.5, sw_batch_size=7, return_probs=True)
    np.testing.assert_allclose(p1, p7, atol=1e-6)
    _, pl = predict(net, vol, patch_size=patch, overlap=0.25, blend="logits", return_probs=True)
    logits = sliding_window(lambda b: net(b), torch.from_numpy(vol)[None], patch, window_steps(patch, 0.25))
    np.testing.assert_allclose(pl, torch.softmax(logits, 0).numpy(), atol=1e-6)
    if sliding_window_inference is not None:
        want = sliding_window_inference(torch.from_numpy(vol)[None, None], patch, 4, net)[0]
        np.testing.assert_allclose(pl, torch.softmax(want, 0).detach().numpy(), atol=1e-6)
    _, pg = predict(net, vol, patch_size=patch, weighting="gaussian", return_probs=True)
    assert not np.allclose(pg, p1, atol=1e-4)  # the weighting changes the blend
    np.testing.assert_allclose(pg.sum(0), 1.0, atol=1e-5)


# ------------------------------------------------------------------ mirroring and ensembles

class _SymmetricNet(torch.nn.Module):
    """Convolutions whose kernels are symmetric under every axis flip: flip-equivariant."""

    def __init__(self, dims, cin=1, k=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
        self.a, self.b = conv(cin, 6, 3, padding=1), conv(6, k, 3, padding=1)
        with torch.no_grad():
            for c in (self.a, self.b):
                w = c.weight
                axes = list(range(2, w.ndim))
                sym = sum(w.flip(list(s)) for r in range(len(axes) + 1) for s in itertools.combinations(axes, r))
                w.copy_(sym / 2 ** len(axes))
        self.in_channels = cin

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_flip_tta_of_an_equivariant_model_changes_nothing():
    net3 = _SymmetricNet(3)
    vol = np.random.default_rng(4).normal(size=(14, 11, 9)).astype(np.float32)
    _, a = predict(net3, vol, patch_size=(8, 8, 8), return_probs=True)
    _, b = predict(net3, vol, patch_size=(8, 8, 8), tta="flip", return_probs=True)
    np.testing.assert_allclose(a, b, atol=1e-5)
    net2 = _SymmetricNet(2)
    _, a = predict(net2, vol, patch_size=(16, 16), return_probs=True)
    _, b = predict(net2, vol, patch_size=(16, 16), tta="flip", return_probs=True)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_flip_tta_is_the_mean_of_the_mirrored_predictions():
    net = _PositionNet(cin=1, dtype=torch.float32, patch=(8, 8, 8))
    vol = np.random.default_rng(5).normal(size=(8, 8, 8)).astype(np.float32)
    x = torch.from_numpy(vol)[None, None]
    with torch.no_grad():
        mirrored = [torch.softmax(net(x.flip(ax)), 1).flip(ax)[0] if ax else torch.softmax(net(x), 1)[0]
                    for ax in [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]]
    want = torch.stack(mirrored).mean(0).numpy()
    labels, got = predict(net, vol, patch_size=(8, 8, 8), tta="flip", return_probs=True)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.array_equal(labels, want.argmax(0))
    _, plain = predict(net, vol, patch_size=(8, 8, 8), return_probs=True)
    assert not np.allclose(plain, want, atol=1e-3)  # the ramp makes the mirrors differ
    # 2D: the four mirrors of the in-plane axes, slice by slice
    net2 = _PositionNet(cin=1, dims=2, dtype=torch.float32, patch=(12, 12))
    img = np.random.default_rng(6).normal(size=(3, 12, 12)).astype(np.float32)
    t = torch.from_numpy(img)[:, None]
    with torch.no_grad():
        want2 = torch.stack([torch.softmax(net2(t.flip(ax)), 1).flip(ax) if ax else torch.softmax(net2(t), 1)
                             for ax in [(), (2,), (3,), (2, 3)]]).mean(0).permute(1, 0, 2, 3).numpy()
    _, got2 = predict(net2, img, patch_size=(12, 12), tta="flip", return_probs=True)
    np.testing.assert_allclose(got2, want2, atol=1e-6)


def test_ensemble_averages_members():
    a, b = _SymmetricNet(3, seed=1), _SymmetricNet(3, seed=2)
    vol = np.random.default_rng(7).normal(size=(8, 8, 8)).astype(np.float32)
    _, pa = predict(a, vol, patch_size=(8, 8, 8), return_probs=True)
    _, pb = predict(b, vol, patch_size=(8, 8, 8), return_probs=True)
    la, paa = predict([a, a], vol, patch_size=(8, 8, 8), return_probs=True)
    np.testing.assert_allclose(paa, pa, atol=1e-7)
    assert np.array_equal(la, pa.argmax(0))
    _, pab = predict([a, b], vol, patch_size=(8, 8, 8), return_probs=True)
    np.testing.assert_allclose(pab, (pa + pb) / 2, atol=1e-6)


# ------------------------------------------------------------------ back to the source grid

@pytest.mark.parametrize("src,dst", [((6, 9, 4), (13, 20, 11)), ((12, 10, 9), (5, 7, 9)), ((7, 7, 7), (7, 15, 3))])
def test_probabilities_resample_like_the_image_resampler(src, dst):
    rng = np.random.default_rng(8)
    p = rng.random((3,) + src)
    p /= p.sum(0)
    want = pp.resample_image(p, dst)  # scipy zoom order 1 (float32 out)
    got = resample_probabilities(torch.from_numpy(p), dst).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-12)  # linear: a partition of unity stays one
    assert np.array_equal(argmax_resampled(torch.from_numpy(p), dst).numpy(), got.argmax(0))


def test_predict_output_shape_is_the_argmax_of_resampled_probabilities():
    net = _SymmetricNet(3)
    vol = np.random.default_rng(9).normal(size=(10, 9, 8)).astype(np.float32)
    _, probs = predict(net, vol, patch_size=(8, 8, 8), return_probs=True)
    want = resample_probabilities(torch.from_numpy(probs), (21, 17, 30)).numpy()
    labels = predict(net, vol, patch_size=(8, 8, 8), output_shape=(21, 17, 30))
    lab2, got = predict(net, vol, patch_size=(8, 8, 8), output_shape=(21, 17, 30), return_probs=True)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.array_equal(labels, want.argmax(0)) and np.array_equal(lab2, labels)


# ------------------------------------------------------------------ published rotation angles

def test_published_rotation_draws_whole_degrees():
    img = np.random.default_rng(0).random((1, 30, 30)).astype(np.float32)
    seen = set()
    for seed in range(200):
        got, _ = rotate(img, None, np.random.default_rng(seed), order=0, fill="zero", integer_angle=True)
        angle = int(np.random.default_rng(seed).integers(-20, 20))  # randint(-20, 20): -20 .. 19
        np.testing.assert_array_equal(got[0], ndimage.rotate(img[0], angle, order=0, reshape=False))
        seen.add(angle)
    assert min(seen) == -20 and max(seen) == 19 and len(seen) == 40
    # TrainAugment's published resampling (nearest) draws whole degrees, bilinear draws floats
    for interp, whole in (("nearest", True), ("linear", False)):
        aug = TrainAugment((30, 30), interpolation=interp, fill="zero")
        for seed in range(40):
            rng = np.random.default_rng(seed)
            if rng.random() < 0.5 or rng.random() >= 0.5:
                continue  # rot_flip or no rotation at this seed
            draw = np.random.default_rng(seed)
            draw.random(), draw.random()
            angle = float(draw.integers(-20, 20)) if whole else float(draw.uniform(-20.0, 20.0))
            order = 0 if whole else 1
            mode = "constant"
            want = ndimage.rotate(img[0], angle, order=order, reshape=False, mode=mode, cval=0.0)
            got, _ = aug(img, None, np.random.default_rng(seed))
            np.testing.assert_allclose(got[0], want, atol=1e-6)
            break
        else:
            pytest.fail("no seed drew a rotation")


def test_resampling_bench_quick_favours_probabilities(tmp_path):
    """benches.resampling --quick: on a coarse model grid the probability path beats nearest labels."""
    from benches import resampling

    rows = resampling.run(resampling.QUICK)
    for oracle in ("labels", "soft"):
        old = np.mean([r["dice"] for r in rows if r["oracle"] == oracle and r["path"] == "nearest-labels"])
        new = np.mean([r["dice"] for r in rows if r["oracle"] == oracle and r["path"] == "probabilities"])
        assert new > old + 0.01, (oracle, old, new)
    resampling.main(["--quick", "--csv", str(tmp_path / "r.csv"), "--txt", str(tmp_path / "r.txt")])
    assert (tmp_path / "r.csv").read_text().startswith("case,model_grid,oracle,path,class,dice,hd95_mm")


def test_inference_bench_quick_writes_the_csv_contract(tmp_path):
    """python -m benches.inference --quick: a row per provider and metric, icl equal to MONAI."""
    import csv
    import os
    import subprocess
    import sys

    from benches.common import COLUMNS

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    out = tmp_path / "i.csv"
    proc = subprocess.run([sys.executable, "-m", "benches.inference", "--quick", "--csv", str(out), "--min-time", "0.01"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == COLUMNS
    times = [r for r in rows if r["metric"] == "time"]
    assert {r["provider"] for r in times} >= {"icl-constant", "icl-gaussian", "icl-flip"}
    assert all(float(r["p50"]) > 0 and r["unit"] == "ms" for r in times if not r["unit"].startswith("skipped"))
    for r in rows:
        if r["metric"] == "max_abs_diff":
            assert float(r["unit"].split()[1]) < 1e-5, r
