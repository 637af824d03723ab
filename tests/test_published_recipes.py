"""The published recipes (configs/*_published.yaml) and the published 2D resampling option."""
import json
import os
import re

import numpy as np
import pytest
import torch
import yaml
from scipy import ndimage

from icl import checkpoint as C
from icl.data import make_synthetic
from icl.data.transforms import TrainAugment, rotate
from icl.inference import predict
from icl.models import build_model
from icl.models.head import mlp_mixer_params
from icl.train import ConfigError, TrainConfig, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = {
    # name: (published lr, loss weights, iterations, batch, labeled, synthetic layout, tiny patch, classes)
    "acdc_2d_published": (0.1, (1, 1, 1, 50), 30000, 16, 8, "acdc", [32, 32], 4),
    "brats_3d_published": (0.01, (1, 1, 1, 10), 30000, 4, 2, "brats", [32, 32, 16], 2),
    "amos_3d_published": (0.02, (1, 1, 0.1, 10), 60000, 4, 2, "nifti", [32, 32, 16], 3),
}


def _load(name):
    path = os.path.join(REPO, "configs", name + ".yaml")
    with open(path) as f:
        text = f.read()
    header = " ".join(l.lstrip("#").strip() for l in text.splitlines() if l.startswith("#"))
    return header, yaml.safe_load(text)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_is_the_published_one(name):
    lr, w, iters, bs, lbs, _, _, _ = RECIPES[name]
    text, raw = _load(name)
    cfg = TrainConfig.from_dict(raw, origin=name)
    assert cfg.base_lr == lr and cfg.max_iterations == iters and (cfg.batch_size, cfg.labeled_bs) == (bs, lbs)
    assert (cfg.mixer, cfg.faithful, cfg.global_queries, cfg.max_mixer_params) == ("mlp", True, "batch", None)
    assert tuple(cfg.loss_weights[k] for k in ("supervised", "auxiliary", "pseudo", "consistency")) == w
    assert (cfg.momentum, cfg.weight_decay, cfg.poly_power) == (0.9, 1e-4, 0.9)
    if len(cfg.patch_size) == 2:
        assert (cfg.interpolation, cfg.fill) == ("nearest", "zero")
    mc = {**cfg.model_config(), "in_channels": 1}
    assert mc["arch"] == ("unet2d" if len(cfg.patch_size) == 2 else "unet3d") and mc["faithful"] is True
    # the header's memory statement: the spatial MLP parameters of both heads at the recipe's patch
    stated = int(re.search(r"hold ([\d,]+) parameters in their spatial MLPs", text).group(1).replace(",", ""))
    with torch.device("meta"):
        net = build_model(mc["arch"], 1, cfg.num_classes, cfg.patch_size, mixer="mlp", faithful=True,
                          global_queries="batch", max_mixer_params=None)
    mixers = sum(p.numel() for n, p in net.named_parameters() if ".mlp2." in n or ".norm3." in n)
    assert mixers == stated
    assert mixers == 2 * sum(mlp_mixer_params(int(np.prod(s))) for s in net.sspa.feature_sizes)
    gib = re.search(r"about ([\d.]+) GiB for parameters \+ gradients \+ SGD momentum", text)
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert abs(float(gib.group(1)) - (total + 2 * trainable) * 4 / 2 ** 30) < 0.1


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("recipes")
    return {
        "acdc": make_synthetic(str(base / "acdc"), "acdc", num_train=4, seed=0)["root"],
        "brats": make_synthetic(str(base / "brats"), "brats", num_train=4, shape=(32, 32, 16), seed=1)["root"],
        "nifti": make_synthetic(str(base / "nifti"), "nifti", num_train=4, shape=(32, 32, 16), seed=2)["root"],
    }


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_runs_at_tiny_size(name, roots, tmp_path):
    """The recipe as written (data set kind, heads, lr, loss weights, resampling), only smaller."""
    _, _, _, _, _, layout, patch, K = RECIPES[name]
    _, raw = _load(name)
    raw.update(root=roots[layout], out=str(tmp_path / "run"), patch_size=patch, max_iterations=2, batch_size=4,
               labeled_bs=2, labeled_num=None, labeled_fraction=0.5, num_classes=K, val_every=2, save_every=0, num_workers=0, progress=False,
               num_overlays=0)
    if raw["dataset"] == "nifti":
        raw["target_spacing"] = [1.5, 1.5, 2.0]
    res = train(raw)
    assert res.iteration == 2
    m = json.load(open(tmp_path / "run" / "metrics.json"))
    assert m["config"]["base_lr"] == raw["base_lr"] and m["config"]["faithful"] is True
    assert len(m["val"]) == 1 and m["test"]["num_cases"] >= 1
    ck = C.load(str(tmp_path / "run" / "checkpoints" / "last.pt"))
    assert ck["model_config"]["mixer"] == "mlp" and any(".mlp2." in k for k in ck["model"])
    if len(patch) == 2:
        assert ck["data_config"]["interpolation"] == "nearest"
        assert C.backbone_from_checkpoint(ck).icl_interpolation == "nearest"


# ------------------------------------------------------------------ 2D resampling


def test_zero_fill_nearest_rotation_is_the_published_one():
    img = np.random.default_rng(0).random((1, 40, 30)).astype(np.float32) + 1.0
    lab = (img[0] > 1.5).astype(np.int64)
    got, got_lab = rotate(img, lab, np.random.default_rng(5), order=0, fill="zero")
    angle = float(np.random.default_rng(5).uniform(-20.0, 20.0))
    want = ndimage.rotate(img[0], angle, order=0, reshape=False)  # scipy's defaults: constant 0 fill
    np.testing.assert_array_equal(got[0], want)
    np.testing.assert_array_equal(got_lab, ndimage.rotate(lab, angle, order=0, reshape=False))
    assert (got[0] == 0).any()  # zero-filled corners
    edge, _ = rotate(img, lab, np.random.default_rng(5))
    assert (edge[0] > 0).all()  # edge fill never leaves zeros in this positive image
    with pytest.raises(ValueError, match="fill"):
        rotate(img, lab, np.random.default_rng(5), fill="reflect")


def test_nearest_train_resize_keeps_image_values():
    img = np.random.default_rng(1).random((1, 50, 70)).astype(np.float32)
    lab = np.zeros((50, 70), np.int64)
    values = set(img.ravel().tolist())
    for seed in range(6):
        out, _ = TrainAugment((32, 32), interpolation="nearest", fill="zero")(img, lab, np.random.default_rng(seed))
        assert out.shape == (1, 32, 32) and set(out.ravel().tolist()) <= values | {0.0}
        lin, _ = TrainAugment((32, 32))(img, lab, np.random.default_rng(seed))
        assert not set(lin.ravel().tolist()) <= values | {0.0}
    with pytest.raises(ValueError, match="interpolation"):
        TrainAugment((32, 32), interpolation="cubic")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c = torch.nn.Conv2d(1, 3, 5, padding=2)

    def forward(self, x):
        return self.c(x)


def test_nearest_prediction_is_the_published_evaluation():
    """zoom the slice to the patch (order 0), argmax, zoom the labels back (order 0), as val_2D.py."""
    net = _Net().eval()
    vol = np.random.default_rng(2).random((3, 50, 70)).astype(np.float32)
    got = predict(net, vol, patch_size=(32, 32), interpolation="nearest")
    for z in range(3):
        s = ndimage.zoom(vol[z], (32 / 50, 32 / 70), order=0)
        with torch.no_grad():
            p = net(torch.from_numpy(s)[None, None]).argmax(1)[0].numpy()
        np.testing.assert_array_equal(got[z], ndimage.zoom(p, (50 / 32, 70 / 32), order=0))
    lin = predict(net, vol, patch_size=(32, 32))
    assert (lin != got).any()
    net.icl_interpolation = "nearest"  # what a checkpoint of a nearest run sets
    np.testing.assert_array_equal(predict(net, vol, patch_size=(32, 32)), got)
    with pytest.raises(ValueError, match="interpolation"):
        predict(net, vol, patch_size=(32, 32), interpolation="area")


def test_bad_resampling_options(roots, tmp_path):
    base = dict(dataset="acdc", root=roots["acdc"], out=str(tmp_path), num_classes=4, labeled_num=2,
                patch_size=[32, 32])
    with pytest.raises(ConfigError, match="--interpolation"):
        TrainConfig(**base, interpolation="cubic").resolve()
    with pytest.raises(ConfigError, match="--fill"):
        TrainConfig(**base, fill="mirror").resolve()
    with pytest.raises(ConfigError, match="--model"):
        TrainConfig(**base, model="vnet").resolve()
    with pytest.raises(ConfigError, match="multiple of 32"):
        TrainConfig(**{**base, "patch_size": [48, 48]}, model="swinunetr").resolve()
