"""Other backbones: icl.attach (plug-and-play on any network) and MONAI's SwinUNETR.

MONAI is an optional extra (pip install 'icl-kernels[monai]'); without it the
MONAI tests skip and say so, the error-message test still runs.
"""
import builtins
import os

import numpy as np
import pytest
import torch
from torch import nn

import icl
from icl.models import ICLNet, attach, build_backbone, build_model, default_heads

try:
    import einops  # noqa: F401
    import monai  # noqa: F401
    from monai.networks.nets import BasicUNet, SwinUNETR

    HAS_MONAI = True
except ImportError:  # pragma: no cover
    HAS_MONAI = False

needs_monai = pytest.mark.skipif(not HAS_MONAI, reason="MONAI not installed (pip install 'icl-kernels[monai]')")
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(feature_size=12, depths=(1, 1, 1, 1))  # the smallest SwinUNETR MONAI builds (F % 12 == 0)


def _labels(B, K, shape):
    return torch.randint(0, K, (B,) + tuple(shape))


def _step(net, x_lab, x_unlab, y, K):
    out = net.forward_train(x_lab, x_unlab, y)
    return icl.icl_losses(out, y, K, icl.LossWeights.published(x_lab.dim() - 2))["total"]


# ------------------------------------------------------------------ generic attach


class _ContractNet(nn.Module):
    """A toy backbone following the return_features contract."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, stride=4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x, return_features=False):
        f1 = self.a(x)
        f2 = self.b(nn.functional.interpolate(f1, scale_factor=2.0))
        y = nn.functional.interpolate(self.out(f2), size=x.shape[2:])
        return (y, [f1, f2]) if return_features else y


class _PlainNet(_ContractNet):
    def forward(self, x):
        return super().forward(x)


def test_attach_contract_and_hooks_see_the_same_maps():
    torch.manual_seed(0)
    contract = _ContractNet()
    plain = _PlainNet()
    plain.load_state_dict(contract.state_dict())
    a = attach(contract, 3, patch_size=(32, 32), num_heads=(2, 1))
    b = attach(plain, 3, feature_modules=["a", plain.b], patch_size=(32, 32), num_heads=(2, 1))
    assert a.feature_channels == b.feature_channels == (16, 8)
    assert b.sspa.feature_sizes == ((8, 8), (16, 16))  # measured by one forward on zeros
    x = torch.randn(2, 1, 32, 32)
    la, fa = a.backbone_features(x)
    lb, fb = b.backbone_features(x)
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    for u, v in zip(fa, fb):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    # hooks are removed after each call; keys are the backbone's own under backbone.
    assert not plain.a._forward_hooks and not plain.b._forward_hooks
    assert set(b.backbone.state_dict()) == set(plain.state_dict())
    assert b(x).shape == (2, 3, 32, 32)


def _twice():
    # a module called twice per forward (shared activation) cannot be tapped unambiguously
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()
            self.c = nn.Conv2d(1, 4, 1)

        def forward(self, x):
            return self.act(self.c(self.act(x)))

    attach(Shared(), 4, feature_modules=["act"], patch_size=(8, 8))


def test_attach_errors_are_clear():
    net = _PlainNet()
    with pytest.raises(ValueError, match="does not have"):
        attach(net, 3, feature_modules=["nope"], patch_size=(32, 32))
    with pytest.raises(ValueError, match="not a submodule"):
        attach(net, 3, feature_modules=[nn.Conv2d(1, 1, 1)], patch_size=(32, 32))
    with pytest.raises(RuntimeError, match="more than once"):
        _twice()
    with pytest.raises(ValueError, match="patch_size is required"):
        attach(net, 3, feature_modules=["a"])
    with pytest.raises(ValueError, match="positive divisor"):
        attach(net, 3, feature_modules=["a", "b"], patch_size=(32, 32), num_heads=(3, 1))
    with pytest.raises(ValueError, match="channels .* given"):
        attach(net, 3, feature_modules=["a", "b"], patch_size=(32, 32), channels=(16, 4), mixer="mlp")
    assert default_heads(128) == 8 and default_heads(96) == 6 and default_heads(24) == 1 and default_heads(8) == 1


@needs_monai
def test_attach_basicunet_readme_example_trains():
    """The worked example of docs/backbones.md: ICL on MONAI's BasicUNet, three decoder stages, one SGD step."""
    torch.manual_seed(0)
    backbone = BasicUNet(spatial_dims=2, in_channels=1, out_channels=4, features=(16, 32, 64, 128, 256, 32))
    net = icl.attach(backbone, num_classes=4, feature_modules=["upcat_4", "upcat_3", "upcat_2"], patch_size=(64, 64))
    assert net.feature_channels == (128, 64, 32) and net.sspa.num_heads == (8, 4, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(4, 1, 64, 64), _labels(2, 4, (64, 64))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    loss = _step(net, x[:2], x[2:], y, 4)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    net.eval()
    assert icl.predict(net, torch.randn(80, 72)).shape == (80, 72)


# ------------------------------------------------------------------ SwinUNETR


def test_swinunetr_without_monai_names_the_extra(monkeypatch):
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "monai" or name.startswith("monai."):
            raise ImportError("No module named 'monai'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"icl-kernels\[monai\]"):
        build_model("swinunetr", 1, 2, (64, 64))


@needs_monai
def test_swinunetr_layout_is_the_published_one():
    """ICL on decoder5/4/3: 8F/4F/2F channels at 1/16, 1/8, 1/4, heads num_heads[::-1][:3]."""
    for dims, patch in ((2, (64, 64)), (3, (32, 64, 32))):
        net = build_model("swinunetr", 1, 3, patch, spatial_dims=dims, mixer="mlp", faithful=True, **TINY)
        assert isinstance(net.backbone, SwinUNETR) and net.spatial_dims == dims
        assert net.feature_tap.names == ("decoder5", "decoder4", "decoder3")
        assert net.feature_channels == (96, 48, 24) and net.sspa.num_heads == (24, 12, 6)
        assert net.sspa.feature_sizes == tuple(tuple(p // s for p in patch) for s in (16, 8, 4))
        assert net.patch_size == patch and net.backbone.patch_size == 2  # MONAI's own attribute untouched
    net = build_model("swinunetr", 1, 2, (64, 64), feature_size=24, num_heads=(2, 4, 8, 16), depths=(1, 1, 1, 1))
    assert net.feature_channels == (192, 96, 48) and net.sspa.num_heads == (16, 8, 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model("swinunetr", 1, 2, (48, 48), **TINY)
    with pytest.raises(ValueError, match="single-voxel"):
        build_model("swinunetr", 1, 2, (32, 32), **TINY)
    with pytest.raises(ValueError, match="not accepted"):
        build_model("swinunetr", 1, 2, (64, 64), no_such_option=1)


def _pub_swin_keys(F, depths, heads, cin, K, dims, window=7):
    """Keys/shapes of the swinViT part of the published SwinUNETR_icl (code/networks/swinunetr_icl.py,
    its own SwinTransformer copy: patch_embed, layers1..4 of BasicLayer with SwinTransformerBlocks and
    PatchMerging) and the module prefixes of its MONAI blocks."""
    keys = {"swinViT.patch_embed.proj.weight": (F, cin) + (2,) * dims, "swinViT.patch_embed.proj.bias": (F,)}
    for i, (d, h) in enumerate(zip(depths, heads)):
        C = F * 2 ** i
        p = f"swinViT.layers{i + 1}.0"
        for j in range(d):
            b = f"{p}.blocks.{j}"
            keys.update({f"{b}.norm1.weight": (C,), f"{b}.norm1.bias": (C,), f"{b}.norm2.weight": (C,),
                         f"{b}.norm2.bias": (C,),
                         f"{b}.attn.relative_position_bias_table": ((2 * window - 1) ** dims, h),
                         f"{b}.attn.relative_position_index": (window ** dims, window ** dims),
                         f"{b}.attn.qkv.weight": (3 * C, C), f"{b}.attn.qkv.bias": (3 * C,),
                         f"{b}.attn.proj.weight": (C, C), f"{b}.attn.proj.bias": (C,),
                         f"{b}.mlp.linear1.weight": (4 * C, C), f"{b}.mlp.linear1.bias": (4 * C,),
                         f"{b}.mlp.linear2.weight": (C, 4 * C), f"{b}.mlp.linear2.bias": (C,)})
        m = 2 ** dims
        keys.update({f"{p}.downsample.reduction.weight": (2 * C, m * C), f"{p}.downsample.norm.weight": (m * C,),
                     f"{p}.downsample.norm.bias": (m * C,)})
    blocks = ["encoder1", "encoder2", "encoder3", "encoder4", "encoder10", "decoder5", "decoder4", "decoder3",
              "decoder2", "decoder1", "out"]
    return keys, blocks


@needs_monai
@pytest.mark.parametrize("dims", [2, 3])
def test_swinunetr_backbone_loads_a_published_state_dict(dims):
    """A published SwinUNETR_icl state_dict (backbone keys, sspa.*, uscl.*) loads strictly."""
    from test_icl_models import _PubHead, _randomize

    patch = (64, 64) if dims == 2 else (32, 64, 32)  # (32, 32, 32): 1-voxel bottleneck, InstanceNorm refuses
    net = build_model("swinunetr", 1, 3, patch, mixer="mlp", faithful=True, global_queries="batch",
                      patch_merging="published", **TINY)
    own = {k: tuple(v.shape) for k, v in net.backbone_state_dict().items()}
    swin, blocks = _pub_swin_keys(12, (1, 1, 1, 1), (3, 6, 12, 24), 1, 3, dims)
    assert {k: own[k] for k in swin} == swin  # every published swinViT key, same shape
    assert {k.split(".")[0] for k in own} == {"swinViT"} | set(blocks)
    # the parameters of a published checkpoint's backbone: MONAI's SwinUNETR has them all (the
    # published 3D patch merging reads other sub-voxels with them: tests/test_swinunetr_published.py)
    pub_backbone = SwinUNETR(in_channels=1, out_channels=3, spatial_dims=dims, **TINY)
    _randomize(pub_backbone)
    sizes = [tuple(p // s for p in patch) for s in (16, 8, 4)]
    heads = [_PubHead((96, 48, 24), sizes, (24, 12, 6), 3, dims) for _ in range(2)]
    for h in heads:
        _randomize(h)
    state = dict(pub_backbone.state_dict())
    state.update({f"sspa.{k}": v for k, v in heads[0].state_dict().items()})
    state.update({f"uscl.{k}": v for k, v in heads[1].state_dict().items()})
    net.load_published_state_dict(state, strict=True)
    for k, v in pub_backbone.state_dict().items():
        assert torch.equal(net.backbone.state_dict()[k], v), k
    torch.testing.assert_close(net.sspa.guided_Q, heads[0].guided_Q)
    # and the other way round: an ICL-trained backbone loads into a plain MONAI SwinUNETR
    SwinUNETR(in_channels=1, out_channels=3, spatial_dims=dims, **TINY).load_state_dict(net.backbone_state_dict())


def _published_swin_flow(sw, x):
    """The published SwinUNETR_icl.forward up to its ICL inputs, written on MONAI's blocks:
    logits and [dec3, dec2, dec1] (decoder5/4/3 outputs)."""
    hs = sw.swinViT(x, sw.normalize)
    enc0, enc1, enc2, enc3 = sw.encoder1(x), sw.encoder2(hs[0]), sw.encoder3(hs[1]), sw.encoder4(hs[2])
    dec4 = sw.encoder10(hs[4])
    dec3 = sw.decoder5(dec4, hs[3])
    dec2 = sw.decoder4(dec3, enc3)
    dec1 = sw.decoder3(dec2, enc2)
    dec0 = sw.decoder2(dec1, enc1)
    return sw.out(sw.decoder1(dec0, enc0)), [dec3, dec2, dec1]


@needs_monai
@pytest.mark.parametrize("dims", [2, 3])
def test_swinunetr_wiring_matches_published_float64(dims):
    """float64, eval mode: the heads see exactly the decoder maps the published wiring feeds them,
    and SSPA/USCL outputs equal the published modules on those maps."""
    from test_icl_models import _PubHead, _randomize

    torch.manual_seed(0)
    patch = (64, 64) if dims == 2 else (32, 64, 32)  # (32, 32, 32): 1-voxel bottleneck, InstanceNorm refuses
    K = 3
    net = build_model("swinunetr", 1, K, patch, mixer="mlp", faithful=True, global_queries="batch",
                      patch_merging="published", **TINY)
    sizes = [tuple(p // s for p in patch) for s in (16, 8, 4)]
    heads = [_PubHead((96, 48, 24), sizes, (24, 12, 6), K, dims) for _ in range(2)]
    for h in heads:
        _randomize(h)
    state = dict(net.backbone.state_dict())
    state.update({f"sspa.{k}": v for k, v in heads[0].state_dict().items()})
    state.update({f"uscl.{k}": v for k, v in heads[1].state_dict().items()})
    net.load_published_state_dict(state)
    net = net.double().eval()
    heads = [h.double().eval() for h in heads]
    B = 2 if dims == 2 else 1  # float64 3D Swin is slow on CPU; the batch mean is covered in 2D
    x_lab = torch.randn((B, 1) + patch, dtype=torch.float64)
    x_unlab = torch.randn((B, 1) + patch, dtype=torch.float64)
    with torch.no_grad():
        ref_lab, f_lab = _published_swin_flow(net.backbone, x_lab)
        ref_unlab, f_unlab = _published_swin_flow(net.backbone, x_unlab)
        logits, feats = net.backbone_features(x_lab)
        assert torch.equal(logits, ref_lab)
        assert len(feats) == 3 and all(torch.equal(a, b) for a, b in zip(feats, f_lab))
        out = net.forward_train(x_lab, x_unlab)
        m_lab, q_lab = heads[0](f_lab)
        m_cons, _ = heads[0](f_unlab)
        m_unlab, _ = heads[1](f_unlab, [q.mean(0, keepdim=True) for q in q_lab])
    torch.testing.assert_close(out.logits_lab, ref_lab, rtol=0, atol=0)
    torch.testing.assert_close(out.logits_unlab, ref_unlab, rtol=0, atol=0)
    for got, want in ((out.maps_lab, m_lab), (out.maps_unlab_sspa, m_cons), (out.maps_unlab, m_unlab)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@needs_monai
def test_swinunetr_icl_step_every_parameter_gets_a_gradient():
    net = build_model("swinunetr", 1, 3, (64, 64), **TINY).train()
    x, y = torch.randn(4, 1, 64, 64), _labels(2, 3, (64, 64))
    _step(net, x[:2], x[2:], y, 3).backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_build_backbone_errors():
    with pytest.raises(ValueError, match="arch must be one of"):
        build_backbone("vnet", 1, 2)
    with pytest.raises(ValueError, match="takes no options"):
        build_backbone("unet2d", 1, 2, feature_size=12)
    with pytest.raises(ValueError, match="arch must be one of"):
        build_model("swin", 1, 2, (64, 64))


# ------------------------------------------------------------------ training smoke tests per backbone


@pytest.fixture(scope="module")
def swin_roots(tmp_path_factory):
    from icl.data import make_synthetic

    base = tmp_path_factory.mktemp("swin")
    return {"acdc": make_synthetic(str(base / "acdc"), "acdc", num_train=4, shape=(4, 64, 64), seed=0)["root"],
            "brats": make_synthetic(str(base / "brats"), "brats", num_train=4, shape=(32, 64, 32), seed=1)["root"]}


@needs_monai
def test_swinunetr_trains_from_the_cli(swin_roots, tmp_path, capsys):
    """icl train --model swinunetr (tiny SwinUNETR from a config), then predict and export its checkpoint."""
    import csv
    import yaml

    from icl import checkpoint as C
    from icl.cli import main

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"model_options": {"feature_size": 12, "depths": [1, 1, 1, 1]}}))
    out = tmp_path / "run"
    code = main(["train", "--config", str(cfg), "--model", "swinunetr", "--dataset", "acdc", "--root",
                 swin_roots["acdc"], "--num-classes", "4", "--labeled-fraction", "0.5", "--patch-size", "64", "64",
                 "--batch-size", "4", "--labeled-bs", "2", "--max-iterations", "3", "--val-every", "3",
                 "--no-progress", "--num-workers", "0", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(np.isfinite(float(r["total"])) and float(r["auxiliary"]) > 0 for r in rows)
    ck = C.load(str(out / "checkpoints" / "best.pt"))
    assert ck["model_config"]["arch"] == "swinunetr"
    assert ck["model_config"]["backbone_options"] == {"feature_size": 12, "depths": [1, 1, 1, 1]}
    assert any(k.startswith("backbone.swinViT.") for k in ck["model"]) and any(k.startswith("sspa.") for k in ck["model"])
    net = C.backbone_from_checkpoint(ck)
    assert isinstance(net, SwinUNETR) and net.icl_patch_size == (64, 64)
    vol = os.path.join(swin_roots["acdc"], "data", sorted(os.listdir(os.path.join(swin_roots["acdc"], "data")))[0])
    assert main(["predict", "--checkpoint", str(out / "checkpoints" / "best.pt"), vol, "--out", str(tmp_path / "pred"),
                 "--no-progress"]) == 0
    assert len(os.listdir(tmp_path / "pred")) == 1
    assert main(["export", "--checkpoint", str(out / "checkpoints" / "best.pt"), "--out", str(tmp_path / "bb.pt")]) == 0
    SwinUNETR(in_channels=1, out_channels=4, spatial_dims=2, **TINY).load_state_dict(
        torch.load(tmp_path / "bb.pt", weights_only=True))


@needs_monai
@pytest.mark.parametrize("method", ["icl", "supervised"])
def test_swinunetr_3d_trains(swin_roots, tmp_path, method):
    from icl.train import train

    res = train(dict(dataset="brats2019", root=swin_roots["brats"], out=str(tmp_path / "r"), num_classes=2,
                     labeled_num=2, patch_size=[32, 64, 32], batch_size=2, labeled_bs=1, max_iterations=2,
                     model="swinunetr", model_options=dict(TINY), method=method, val_every=0, save_every=0,
                     num_workers=0, progress=False, test=False))
    assert res.iteration == 2
    assert isinstance(res.model if method == "supervised" else res.model.backbone, SwinUNETR)
