"""Semi-supervised methods under the one trainer (icl/methods), their views, and
the synthetic population of the label-efficiency benchmark."""
import csv
import os
import signal

import numpy as np
import pytest
import torch

from icl import checkpoint as C
from icl.data import make_synthetic
from icl.methods import METHODS, get_method
from icl.methods import views
from icl.train import ConfigError, TrainConfig, TrainingInterrupted, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def acdc(tmp_path_factory):
    return make_synthetic(str(tmp_path_factory.mktemp("ssl") / "acdc"), "acdc", num_train=6, seed=0)["root"]


def _cfg(root, out, **kw):
    c = dict(dataset="synthetic", root=root, out=str(out), num_workers=0, progress=False, seed=0, val_every=0,
             save_every=0, num_classes=4, labeled_num=2, patch_size=[32, 32], batch_size=4, labeled_bs=2,
             global_queries="batch")
    c.update(kw)
    return c


def _log(out):
    with open(os.path.join(out, "log.csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method,extra", [
    ("supervised", {}), ("mean-teacher", {}), ("fixmatch", {}), ("unimatch", {}), ("icl", {}), ("icl", {"icl_views": "weak-strong"}),
    ("icl", {"icl_views": "weak-strong-all"}), ("icl", {"icl_views": "weak-strong-confident"}),
    ("icl", {"icl_views": "one-confident", "confidence_threshold": 0.6}), ("icl", {"icl_passes": "joint"}),
    ("icl", {"icl_views": "weak-strong-confident", "icl_passes": "joint"}),
])
def test_each_method_learns(acdc, tmp_path, method, extra):
    out = tmp_path / "run"
    train(_cfg(acdc, out, method=method, max_iterations=30, test=False, base_lr=0.03, **extra))
    rows = _log(out)
    assert len(rows) == 30
    sup = [float(r["supervised"]) for r in rows]
    assert np.mean(sup[-5:]) < 0.8 * np.mean(sup[:5]), (method, sup[:5], sup[-5:])
    ck = C.load(str(out / "checkpoints" / "last.pt"))
    assert ck["model_config"]["method"] == method
    # every method's checkpoint gives the plain backbone for inference
    net = C.backbone_from_checkpoint(ck)
    assert type(net).__name__ == "UNet2D"
    if method == "mean-teacher":
        assert float(rows[-1]["consistency"]) >= 0 and "teacher" in ck["method_state"]
    if method in ("fixmatch", "unimatch") or extra.get("icl_views", "").endswith("confident"):
        assert all(0.0 <= float(r["mask_ratio"]) <= 1.0 for r in rows)
    if extra.get("icl_views", "").endswith("confident"):
        assert all(float(r["confident"]) >= 0.0 for r in rows)
        assert max(float(r["confident"]) for r in rows) > 0.0  # some pixels passed the threshold


def test_mean_teacher_resume_is_bitwise_equal(acdc, tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        common = dict(method="mean-teacher", max_iterations=8, deterministic=True, test=False,
                      intensity_aug="default")
        full = train(_cfg(acdc, tmp_path / "full", **common))

        def interrupt(it, row):
            if it == 5:
                os.kill(os.getpid(), signal.SIGINT)

        with pytest.raises(TrainingInterrupted):
            train(_cfg(acdc, tmp_path / "cut", **common), hooks=[interrupt])
        resumed = train(_cfg(acdc, tmp_path / "cut", resume="auto", **common))
        assert resumed.iteration == 8
        for k, v in full.model.state_dict().items():
            assert torch.equal(v, resumed.model.state_dict()[k]), k
        a = C.load(str(tmp_path / "full" / "checkpoints" / "last.pt"))["method_state"]["teacher"]
        b = C.load(str(tmp_path / "cut" / "checkpoints" / "last.pt"))["method_state"]["teacher"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        # the teacher is an average, not a copy of the student
        assert not all(torch.equal(a[k], full.model.state_dict()[k]) for k in a if a[k].is_floating_point())
        assert [r["total"] for r in _log(tmp_path / "full")] == [r["total"] for r in _log(tmp_path / "cut")]
    finally:
        torch.use_deterministic_algorithms(False)


def test_resume_without_teacher_is_refused(acdc, tmp_path):
    train(_cfg(acdc, tmp_path / "r", method="mean-teacher", max_iterations=2, test=False))
    p = tmp_path / "r" / "checkpoints" / "last.pt"
    ck = torch.load(str(p), weights_only=True)
    ck["method_state"] = {}
    torch.save(ck, str(p))
    with pytest.raises(C.CheckpointError, match="teacher"):
        train(_cfg(acdc, tmp_path / "r", method="mean-teacher", max_iterations=4, test=False, resume="auto"))


def test_method_config_errors(acdc, tmp_path):
    with pytest.raises(ConfigError, match="--method 'bogus'"):
        TrainConfig(**_cfg(acdc, tmp_path, method="bogus")).resolve()
    with pytest.raises(ConfigError, match="no unlabeled slot"):
        TrainConfig(**_cfg(acdc, tmp_path, method="fixmatch", labeled_bs=4)).resolve()
    with pytest.raises(ConfigError, match="unknown term.*auxiliary.*mean-teacher"):
        TrainConfig(**_cfg(acdc, tmp_path, method="mean-teacher", loss_weights={"auxiliary": 1.0})).resolve()
    with pytest.raises(ConfigError, match="--icl-views"):
        TrainConfig(**_cfg(acdc, tmp_path, method="icl", icl_views="three")).resolve()
    with pytest.raises(ConfigError, match="weights must be numbers >= 0"):
        TrainConfig(**_cfg(acdc, tmp_path, method="icl", loss_weights={"pseudo": -1.0})).resolve()
    with pytest.raises(ConfigError, match="--icl-passes 'both'"):
        TrainConfig(**_cfg(acdc, tmp_path, method="icl", icl_passes="both")).resolve()
    with pytest.raises(ConfigError, match="'confident' term needs --icl-views"):
        TrainConfig(**_cfg(acdc, tmp_path, method="icl", loss_weights={"confident": 2.0})).resolve()
    TrainConfig(**_cfg(acdc, tmp_path, method="icl", icl_views="one-confident",
                       loss_weights={"confident": 2.0})).resolve()
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="--confidence-threshold"):
            TrainConfig(**_cfg(acdc, tmp_path, method="fixmatch", confidence_threshold=bad)).resolve()
    # the supervised baseline may use the whole batch for labeled items
    TrainConfig(**_cfg(acdc, tmp_path, method="supervised", labeled_bs=4)).resolve()
    with pytest.raises(ConfigError, match="unimatch needs a backbone with an encoder/decoder"):
        TrainConfig(**_cfg(acdc, tmp_path, method="unimatch", model="swinunetr", patch_size=[64, 64])).resolve()
    # the backbone registry's patch rules hold at config time (32 x 32: a one-voxel SwinUNETR bottleneck)
    with pytest.raises(ConfigError, match="--patch-size 32 32: swinunetr would have a single-voxel bottleneck"):
        TrainConfig(**_cfg(acdc, tmp_path, method="icl", model="swinunetr")).resolve()
    assert set(METHODS) == {"supervised", "icl", "mean-teacher", "fixmatch", "unimatch"}
    assert get_method("fixmatch").name == "fixmatch"


def test_icl_joint_pass_equals_split_passes_without_batch_statistics():
    """With BatchNorm on running statistics and no dropout (eval mode) the joint pass
    computes what the two separate passes do; in training mode it normalises the
    labeled and unlabeled images together, so the labeled outputs change."""
    from icl.models import build_model

    torch.manual_seed(0)
    net = build_model("unet2d", 1, 3, (32, 32), mixer="conv", backend="torch").double()
    x_lab, x_un, x_strong = (torch.randn(2, 1, 32, 32, dtype=torch.float64) for _ in range(3))
    y = torch.randint(0, 3, (2, 32, 32))
    net.eval()
    for strong in (None, x_strong):
        a = net.forward_train(x_lab, x_un, y, x_unlab_strong=strong)
        b = net.forward_train(x_lab, x_un, y, x_unlab_strong=strong, joint=True)
        for name in ("logits_lab", "logits_unlab", "logits_unlab_strong", "maps_lab", "maps_unlab",
                     "maps_unlab_sspa", "queries_lab"):
            va, vb = getattr(a, name), getattr(b, name)
            for ta, tb in zip(*(v if isinstance(v, list) else [v] for v in (va, vb))):
                torch.testing.assert_close(ta, tb, rtol=1e-10, atol=1e-10, msg=name)
    net.train()
    torch.manual_seed(1)
    a = net.forward_train(x_lab, x_un, y)
    torch.manual_seed(1)
    b = net.forward_train(x_lab, x_un, y, joint=True)
    assert not torch.allclose(a.logits_lab, b.logits_lab)
    b.logits_lab.sum().backward()
    assert all(p.grad is not None for p in net.backbone.parameters() if p.requires_grad)


# ------------------------------------------------------------------- views
def test_unimatch_feature_perturbation_drops_channels_and_trains_both_halves():
    from icl.methods.unimatch import perturbed_logits
    from icl.models.unet import UNet2D

    torch.manual_seed(0)
    net = UNet2D(1, 3).eval()  # eval: the encoder's own dropout is off, only the perturbation acts
    x = torch.rand(2, 1, 32, 32)
    plain = net(x)
    torch.manual_seed(1)
    a = perturbed_logits(net, x)
    torch.manual_seed(1)
    b = perturbed_logits(net, x)
    assert a.shape == plain.shape and torch.equal(a, b)  # follows the torch seed
    assert not torch.allclose(a, plain)  # perturbed even in eval mode
    assert torch.allclose(perturbed_logits(net, x, p=0.0), plain, atol=1e-6)
    a.square().mean().backward()
    assert net.encoder.in_conv.conv_conv[0].weight.grad.abs().sum() > 0
    assert net.decoder.out_conv.weight.grad.abs().sum() > 0


def test_intensity_curve_keeps_background_and_range():
    torch.manual_seed(0)
    x = torch.rand(6, 2, 16, 16)
    x[:, :, :4] = 0.0
    y = views.random_intensity_curve(x)
    assert y.shape == x.shape
    assert torch.all(y[:, :, :4] == 0.0)
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert not torch.allclose(y, x)
    # piecewise linear: equal inputs map to equal outputs within a sample and channel
    x2 = torch.full((1, 1, 4, 4), 0.3)
    assert torch.unique(views.random_intensity_curve(x2)).numel() == 1


def test_strong_view_cutout_mask_matches_zeroed_boxes():
    torch.manual_seed(1)
    x = torch.rand(8, 1, 20, 24) + 0.5
    out, keep = views.cutout(x, p=1.0)
    assert keep.shape == (8, 20, 24) and (~keep).any(dim=(1, 2)).all()
    assert torch.all(out[:, 0][~keep] == 0) and torch.equal(out[:, 0][keep], x[:, 0][keep])
    s, k = views.strong_view(x)
    assert s.shape == x.shape and k.dtype == torch.bool


def test_views_follow_the_torch_seed():
    x = torch.rand(3, 1, 8, 8)
    torch.manual_seed(5)
    a = views.strong_view(x)
    torch.manual_seed(5)
    b = views.strong_view(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------- population
population = pytest.importorskip("icl.demo.population")


@pytest.fixture(scope="module")
def template():
    pytest.importorskip("nilearn", reason="the population is built from the template in the nilearn wheel")
    return population._template()


def test_population_subjects_deterministic_and_distinct(template):
    spec = population.PopulationSpec(size=32)
    a_img, a_lab, a_info = population.make_subject(template, spec, [0, 5], 3)
    b_img, b_lab, b_info = population.make_subject(template, spec, [0, 5], 3)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab) and a_info == b_info
    c_img, c_lab, c_info = population.make_subject(template, spec, [0, 6], 3)
    assert not np.array_equal(a_lab, c_lab) and c_info != a_info
    assert a_img.shape == (3, 32, 32) and a_lab.dtype == np.uint8 and set(np.unique(a_lab)) <= {0, 1, 2}
    assert np.isfinite(a_img).all() and a_img.min() >= 0


def test_population_labels_align_with_images(template, monkeypatch):
    # Only white matter bright, no blur/noise/bias/texture: the bright pixels are the
    # white-matter label wherever the deformation moved them (warped with the image).
    spec = population.PopulationSpec(size=64, max_bias=0.0, max_blur=0.0, noise=(0.0, 0.0), texture=0.0,
                                     elastic_amplitude=4.0, max_rotation=15.0)
    monkeypatch.setattr(population, "_draw_contrast", lambda rng, spec, canonical: ("test", [0.0, 0.0, 1.0]))
    dices = []
    for s in range(3):
        img, lab, _ = population.make_subject(template, spec, [1, s], 4)
        bright = img > 0.5 * img.max()
        wm = lab == 2
        dices.append(2 * (bright & wm).sum() / (bright.sum() + wm.sum()))
        # the same image against another subject's labels does not align
        _, other, _ = population.make_subject(template, spec, [1, s + 10], 4)
        assert 2 * (bright & (other == 2)).sum() / (bright.sum() + (other == 2).sum()) < dices[-1] - 0.1
    assert min(dices) > 0.9, dices


def test_population_layout_is_trainable(tmp_path):
    pytest.importorskip("nilearn")
    spec = population.PopulationSpec(size=32, labeled_slices=2, train_slices=3, unlabeled_subjects=2,
                                     val_subjects=1, test_subjects=2, eval_slices=3)
    meta = population.build_population(str(tmp_path / "pop"), spec, log=lambda *a: None)
    assert meta["counts"] == {"train_slices": 9, "train": 3, "val": 1, "test": 2}
    lines = (tmp_path / "pop" / "train_slices.list").read_text().split()
    assert lines[:2] == meta["labeled_slices"] and all(n.startswith("sub000") for n in lines[:2])
    again = population.build_population(str(tmp_path / "pop"), spec, log=lambda *a: None)
    assert again == meta  # reused, not rebuilt
    with pytest.raises(ValueError, match="labeled_slices"):
        population.PopulationSpec(labeled_slices=9, train_slices=8).validate()
