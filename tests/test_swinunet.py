"""The Swin-Unet 2D backbone (icl.models.swinunet): the published network's math, keys, pretrained
weights, ICL heads and a command-line run.

The reference below is this file's own transcription of the published SwinTransformerSys
computation (zhuye98/ICL code/networks/swinunet_icl.py), written differently from the
implementation: windows are gathered by index arithmetic on the rolled grid, the shift mask from
region ids, the relative-position index from coordinates, the patch expansions with pixel_shuffle.
It reads the parameters by their published names and computes its own index and mask buffers.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import icl
from icl.models import build_backbone, build_model, get_backbone
from icl.models.swinunet import SwinUnet2D, build_swinunet, load_swin_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SMALL = dict(embed_dim=12, num_heads=(1, 2, 3, 6), window_size=4)  # 64x64: token grids 16, 8, 4, 2


# -- the reference ---------------------------------------------------------------------------


def _ln(P, name, x):
    return F.layer_norm(x, x.shape[-1:], P[name + ".weight"], P[name + ".bias"], eps=1e-5)


def _lin(P, name, x, bias=True):
    return F.linear(x, P[name + ".weight"], P.get(name + ".bias") if bias else None)


def _block(P, name, t, grid, heads, window, odd):
    H, W = grid
    if min(H, W) <= window:  # one window covering the grid, never shifted
        ws, shift = min(H, W), 0
    else:
        ws, shift = window, (window // 2 if odd else 0)
    B, L, C = t.shape
    N, d = ws * ws, C // heads
    y = _ln(P, name + ".norm1", t)
    # rolled coordinate v holds the token at (v + shift) mod size; windows tile the rolled grid
    rr = torch.arange(H).view(H // ws, ws)
    cc = torch.arange(W).view(W // ws, ws)
    src = ((rr + shift) % H)[:, None, :, None] * W + ((cc + shift) % W)[None, :, None, :]
    src = src.reshape(-1, N)  # [windows, N] token indices
    qkv = _lin(P, name + ".attn.qkv", y[:, src])  # [B, nW, N, 3C]
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, -1, N, heads, d).transpose(2, 3) for i in range(3))
    s = (q * d ** -0.5) @ k.transpose(-1, -2)  # [B, nW, heads, N, N]
    pos = torch.arange(N)
    dy = pos[:, None] // ws - pos[None, :] // ws
    dx = pos[:, None] % ws - pos[None, :] % ws
    table = P[name + ".attn.relative_position_bias_table"]
    s = s + table[(dy + ws - 1) * (2 * ws - 1) + (dx + ws - 1)].permute(2, 0, 1)
    if shift:
        def region(v, n):  # rows (columns) of the rolled grid: before n-ws, up to n-shift, the rest
            return (v >= n - ws).long() + (v >= n - shift).long()
        reg = (region(rr, H)[:, None, :, None] * 3 + region(cc, W)[None, :, None, :]).reshape(-1, N)
        s = s + torch.where(reg[:, :, None] != reg[:, None, :], -100.0, 0.0).to(s.dtype)[None, :, None]
    o = (s.softmax(-1) @ v).transpose(2, 3).reshape(B, -1, N, C)
    o = _lin(P, name + ".attn.proj", o).reshape(B, -1, C)
    inverse = torch.empty(L, dtype=torch.long)
    inverse[src.reshape(-1)] = torch.arange(L)
    t = t + o[:, inverse]
    h = _ln(P, name + ".norm2", t)
    return t + _lin(P, name + ".mlp.fc2", F.gelu(_lin(P, name + ".mlp.fc1", h)))


def _merge(P, name, t, grid):
    H, W = grid
    B, _, C = t.shape
    x = t.reshape(B, H, W, C)
    i, j = torch.arange(H // 2), torch.arange(W // 2)
    parts = [x[:, 2 * i + a][:, :, 2 * j + b] for a, b in ((0, 0), (1, 0), (0, 1), (1, 1))]
    x = torch.cat(parts, -1).reshape(B, -1, 4 * C)
    return F.linear(_ln(P, name + ".norm", x), P[name + ".reduction.weight"])


def _expand(P, name, t, grid, s):
    H, W = grid
    B = t.shape[0]
    x = F.linear(t, P[name + ".expand.weight"])  # channels (p1, p2, c)
    c = x.shape[-1] // (s * s)
    x = x.reshape(B, H, W, s * s, c).permute(0, 4, 3, 1, 2).reshape(B, c * s * s, H, W)  # -> (c, p1, p2)
    x = F.pixel_shuffle(x, s).flatten(2).transpose(1, 2)
    return _ln(P, name + ".norm", x)


def reference(P, x, img, depths, heads, window):
    """(logits, [decoder maps]) of the published SwinTransformerSys for a 3-channel x."""
    H0, W0 = img[0] // 4, img[1] // 4
    t = F.conv2d(x, P["patch_embed.proj.weight"], P["patch_embed.proj.bias"], stride=4).flatten(2).transpose(1, 2)
    t = _ln(P, "patch_embed.norm", t)
    skips = []
    for i in range(4):
        skips.append(t)
        g = (H0 >> i, W0 >> i)
        for j in range(depths[i]):
            t = _block(P, f"layers.{i}.blocks.{j}", t, g, heads[i], window, j % 2 == 1)
        if i < 3:
            t = _merge(P, f"layers.{i}.downsample", t, g)
    t = _expand(P, "layers_up.0", _ln(P, "norm", t), (H0 >> 3, W0 >> 3), 2)
    feats = []
    for u in (1, 2, 3):
        i = 3 - u  # decoder stage u repeats encoder stage i's depth and heads
        g = (H0 >> i, W0 >> i)
        t = _lin(P, f"concat_back_dim.{u}", torch.cat([t, skips[i]], -1))
        for j in range(depths[i]):
            t = _block(P, f"layers_up.{u}.blocks.{j}", t, g, heads[i], window, j % 2 == 1)
        feats.append(t.transpose(1, 2).reshape(t.shape[0], -1, *g))
        if u < 3:
            t = _expand(P, f"layers_up.{u}.upsample", t, g, 2)
    t = _expand(P, "up", _ln(P, "norm_up", t), (H0, W0), 4)
    E = t.shape[-1]
    maps = t.transpose(1, 2).reshape(t.shape[0], E, 4 * H0, 4 * W0)
    return torch.einsum("bchw,kc->bkhw", maps, P["output.weight"][:, :, 0, 0]), feats


def _check_against_reference(img, opts, batch=2, train=False):
    torch.manual_seed(0)
    net = build_backbone("swinunet", 1, 3, img, **opts).double().train(train)
    with torch.no_grad():  # non-trivial LayerNorm affines and zero-initialised biases
        for name, p in net.named_parameters():
            if name.endswith("bias") or ".norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    P = {k[len("swin_unet."):]: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    cfg = dict(dict(depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7), **opts)
    x = torch.randn(batch, 1, *img, dtype=torch.float64)
    x_ref = x.clone().requires_grad_(True)
    x_own = x.clone().requires_grad_(True)
    logits, feats = net(x_own, return_features=True)
    ref_logits, ref_feats = reference(P, x_ref.repeat(1, 3, 1, 1), img, cfg["depths"], cfg["num_heads"],
                                      cfg["window_size"])
    assert logits.shape == (batch, 3) + tuple(img)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
    for f, r in zip(feats, ref_feats):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-10)
    w = [torch.randn_like(t) for t in [logits] + feats]
    sum((a * b).sum() for a, b in zip([logits] + feats, w)).backward()
    sum((a * b).sum() for a, b in zip([ref_logits] + ref_feats, w)).backward()
    torch.testing.assert_close(x_own.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    for name, p in net.named_parameters():
        ref = P[name[len("swin_unet."):]].grad
        assert ref is not None and ref.abs().max() > 0, name
        torch.testing.assert_close(p.grad, ref, rtol=1e-9, atol=1e-10, msg=name)
    return net


def test_matches_reference_small():
    _check_against_reference((64, 64), SMALL)


def test_matches_reference_224_geometry():
    # the published geometry (grids 56, 28, 14, 7; window 7, shifted by 3; the 7x7 bottleneck one
    # unshifted window) with narrow stages to stay cheap
    _check_against_reference((224, 224), dict(embed_dim=12, num_heads=(1, 2, 3, 6)), batch=1)


def test_matches_reference_rectangular_train_mode():
    # non-square grids (16x32 ... 2x4) and training mode without stochastic depth
    _check_against_reference((64, 128), dict(SMALL, depths=(2, 1, 2, 1), drop_path_rate=0.0), batch=1, train=True)


@pytest.mark.slow  # about 20 s on one thread: 27M float64 parameters through both computations
def test_matches_reference_published_lite_224():
    _check_against_reference((224, 224), {}, batch=1)


def test_drop_path_is_per_sample_and_off_in_eval():
    torch.manual_seed(0)
    net = build_backbone("swinunet", 1, 2, (64, 64), **SMALL, drop_path_rate=0.5).double()
    x = torch.randn(2, 1, 64, 64, dtype=torch.float64)
    net.eval()
    a = net(x)
    torch.testing.assert_close(net(x), a)
    net.train()
    torch.manual_seed(1)
    b = net(x)
    assert (a - b).abs().max() > 1e-3  # stochastic depth acts in training


# -- keys, shapes, geometry rules -----------------------------------------------------------------


def _published_entries():
    with open(os.path.join(DATA, "swinunet_icl_lite_224_state.json")) as f:
        return [(k, tuple(s)) for k, s, _ in json.load(f)["entries"]]


def test_state_dict_equals_published_keys_and_shapes():
    published = [(k, s) for k, s in _published_entries() if k.startswith("swin_unet.")]
    assert len(published) == 238
    net = build_backbone("swinunet", 1, 4, (224, 224))
    own = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    assert own == published
    assert sum(p.numel() for p in net.parameters()) == 27_168_420
    assert not any(k.startswith("swin_unet.layers_up.1.downsample") for k, _ in own)


def test_icl_model_loads_a_published_state_strictly():
    entries = _published_entries()
    net = build_model("swinunet", 1, 4, (224, 224), mixer="mlp", faithful=True, max_mixer_params=None)
    # the published heads read the decoder tokens without the tokeniser (conv, LayerNorm)
    for head in (net.sspa, net.uscl):
        assert head.norm_layers is None and all(isinstance(m, torch.nn.Identity) for m in head.proj_layers)
    assert net.feature_channels == (384, 192, 96)
    assert net.sspa.num_heads == (24, 12, 6) and net.sspa.feature_sizes == ((14, 14), (28, 28), (56, 56))
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) if k.endswith(("weight", "bias", "table")) else torch.zeros(s)
             for k, s in entries}
    own_state = net.state_dict()
    for k in ("swin_unet.layers.0.blocks.0.attn.relative_position_index",):  # integer buffers as they are
        state[k] = own_state["backbone." + k].clone()
    net.load_published_state_dict(state, strict=True)
    after = net.state_dict()
    key = "sspa.class_decoders.2.mlp2.fc1.weight"
    torch.testing.assert_close(after[key], state[key])
    torch.testing.assert_close(after["sspa.class_decoders.0.attn.norm_x.weight"],
                               state["sspa.class_decoders.0.norm1.weight"])
    torch.testing.assert_close(after["backbone.swin_unet.layers_up.1.blocks.1.attn.qkv.weight"],
                               state["swin_unet.layers_up.1.blocks.1.attn.qkv.weight"])
    # a backbone exported by the published script (its swin_unet.* entries) loads as it is
    bare = build_backbone("swinunet", 1, 4, (224, 224))
    bare.load_state_dict({k: v for k, v in state.items() if k.startswith("swin_unet.")}, strict=True)


def test_non_faithful_heads_keep_the_tokeniser():
    net = build_model("swinunet", 1, 3, (64, 64), **SMALL)
    assert isinstance(net.sspa.proj_layers[0], torch.nn.Conv2d)
    out = net.forward_train(torch.randn(2, 1, 64, 64), torch.randn(2, 1, 64, 64))
    assert [tuple(m.shape) for m in out.maps_lab] == [(2, 3, 4, 4), (2, 3, 8, 8), (2, 3, 16, 16)]
    assert net.feature_channels == (48, 24, 12)


def test_geometry_rules():
    spec = get_backbone("swinunet")
    assert spec.patch_problem((224, 224)) is None
    assert "multiple of 32" in spec.patch_problem((200, 200))
    assert "2-D" in spec.patch_problem((64, 64, 64))
    with pytest.raises(ValueError, match=r"window_size 7 does not tile stage 0's 16x16"):
        build_backbone("swinunet", 1, 4, (64, 64))
    with pytest.raises(ValueError, match=r"img_size 224 must equal the patch size \(64, 64\)"):
        build_backbone("swinunet", 1, 4, (64, 64), img_size=224, window_size=4)
    with pytest.raises(ValueError, match="num_heads must divide"):
        build_backbone("swinunet", 1, 4, (64, 64), embed_dim=12, num_heads=(5, 2, 3, 6), window_size=4)
    with pytest.raises(ValueError, match="four stages"):
        build_backbone("swinunet", 1, 4, (64, 64), depths=(2, 2, 2), window_size=4)
    with pytest.raises(ValueError, match="unknown option"):
        build_backbone("swinunet", 1, 4, (64, 64), window_size=4, feature_size=48)
    with pytest.raises(ValueError, match="patch_size is not a setting"):
        build_swinunet(1, 4, 2, patch=(64, 64), window_size=4, patch_size=2)
    net = build_backbone("swinunet", 1, 4, (64, 64), **SMALL)
    with pytest.raises(ValueError, match="built for 64x64 inputs"):
        net(torch.randn(1, 1, 96, 96))
    with pytest.raises(ValueError, match=r"expected a \[B, 1, H, W\] input"):
        net(torch.randn(1, 3, 64, 64))
    # without a patch (a checkpoint that did not record one): img_size, default 224
    assert build_backbone("swinunet", 1, 4, embed_dim=12, num_heads=(1, 2, 3, 6)).swin_unet.img_size == (224, 224)
    # three-channel input embeds as it is; other counts too (without ImageNet's 3-channel weights)
    assert build_backbone("swinunet", 3, 4, (64, 64), **SMALL).swin_unet.patch_embed.proj.in_channels == 3
    assert build_backbone("swinunet", 2, 4, (64, 64), **SMALL).swin_unet.patch_embed.proj.in_channels == 2


# -- pretrained weights -------------------------------------------------------------------------


def _imagenet_like(net: SwinUnet2D):
    """A Swin-T-style checkpoint for ``net``'s encoder: published key names under 'model', a
    classifier, a block beyond the network's depth and one tensor of another shape."""
    g = torch.Generator().manual_seed(3)
    enc = {k: torch.randn(v.shape, generator=g) for k, v in net.swin_unet.state_dict().items()
           if k.startswith(("patch_embed.", "layers.", "norm.")) and v.is_floating_point()}
    enc["head.weight"], enc["head.bias"] = torch.randn(1000, 96), torch.randn(1000)
    enc["layers.2.blocks.5.attn.qkv.weight"] = torch.randn(3 * 48, 48)  # Swin-T's stage 2 has 6 blocks
    enc["layers.0.blocks.1.attn.attn_mask_unused"] = torch.zeros(1)
    enc["patch_embed.proj.weight"] = torch.randn(12, 3, 4, 4)  # 3 channels; the network below takes 2
    return {"model": enc}


def test_pretrained_imagenet_mapping(tmp_path):
    net = build_backbone("swinunet", 2, 4, (64, 64), **SMALL)
    ckpt = _imagenet_like(net)
    path = str(tmp_path / "swin_tiny.pth")
    torch.save(ckpt, path)
    before = {k: v.clone() for k, v in net.swin_unet.state_dict().items()}
    report = load_swin_pretrained(net, path)
    after = net.swin_unet.state_dict()
    enc = ckpt["model"]
    torch.testing.assert_close(after["layers.1.blocks.0.attn.qkv.weight"], enc["layers.1.blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(after["norm.weight"], enc["norm.weight"])
    # encoder stage N also initialises decoder stage 3 - N (blocks only: no downsample there)
    for n in (0, 1, 2):
        torch.testing.assert_close(after[f"layers_up.{3 - n}.blocks.1.mlp.fc1.weight"],
                                   enc[f"layers.{n}.blocks.1.mlp.fc1.weight"])
    for k in ("layers_up.0.expand.weight", "concat_back_dim.1.weight", "up.expand.weight", "output.weight",
              "layers_up.1.upsample.expand.weight", "patch_embed.proj.weight"):
        torch.testing.assert_close(after[k], before[k])  # not in the checkpoint, or of another shape
    assert report.source == "imagenet"
    assert report.shape_skipped == ["patch_embed.proj.weight: (12, 3, 4, 4) vs (12, 2, 4, 4)"]
    assert {"head.weight", "head.bias", "layers.2.blocks.5.attn.qkv.weight", "layers_up.0.blocks.0.norm1.weight",
            "layers_up.1.downsample.norm.weight"} <= set(report.unused)
    assert "layers_up.3.blocks.0.attn.qkv.weight" in report.loaded and "output.weight" in report.untouched
    assert "loaded" in report.summary()


def test_pretrained_swinunet_state_and_options(tmp_path):
    src = build_backbone("swinunet", 1, 4, (64, 64), **SMALL)
    state = {"module." + k: v for k, v in src.state_dict().items()}  # a DataParallel SwinUnet's keys
    path = str(tmp_path / "swinunet.pth")
    torch.save(state, path)
    net = build_backbone("swinunet", 1, 4, (64, 64), **SMALL, pretrained=path)
    own = net.state_dict()
    for k, v in src.state_dict().items():
        if "output" in k:  # the classifier is dropped, as published
            assert not torch.equal(own[k], v)
        else:
            torch.testing.assert_close(own[k], v)
    # through build_model (model_options) as well
    icl_net = build_model("swinunet", 1, 4, (64, 64), **SMALL, pretrained=path)
    torch.testing.assert_close(icl_net.backbone.state_dict()["swin_unet.norm.weight"], src.state_dict()["swin_unet.norm.weight"])


def test_pretrained_errors(tmp_path):
    net = build_backbone("swinunet", 1, 4, (64, 64), **SMALL)
    with pytest.raises(FileNotFoundError, match="no such file .*missing.pth"):
        load_swin_pretrained(net, str(tmp_path / "missing.pth"))
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .*garbage.pth"):
        load_swin_pretrained(net, str(bad))
    other = tmp_path / "other.pth"
    torch.save({"model": {"encoder.weight": torch.zeros(3), "layers.0.blocks.0.norm1.weight": torch.zeros(5)}},
               str(other))
    with pytest.raises(ValueError, match=r"0 of 236 loaded; 2 name\(s\) matched with other shapes.*"
                                         r"layers.0.blocks.0.norm1.weight.*encoder.weight"):
        load_swin_pretrained(net, str(other))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_backbone("swinunet", 1, 4, (64, 64), **SMALL, pretrained=str(tmp_path / "missing.pth"))


# -- the command line -----------------------------------------------------------------------------


def test_cli_training_run_with_pretrained(tmp_path, capsys):
    from icl.checkpoint import backbone_from_checkpoint, load
    from icl.cli import main
    from icl.data import make_synthetic

    root = make_synthetic(str(tmp_path / "data"), "acdc", num_train=4, shape=(3, 64, 64), seed=0)["root"]
    src = build_backbone("swinunet", 1, 4, (64, 64), **SMALL)
    weights = str(tmp_path / "init.pth")
    torch.save({"model": {k[len("swin_unet."):]: v for k, v in src.state_dict().items()
                          if k.startswith("swin_unet.layers.")}}, weights)
    config = tmp_path / "swin.yaml"
    config.write_text("model: swinunet\nmodel_options: {embed_dim: 12, num_heads: [1, 2, 3, 6], window_size: 4}\n")
    out = tmp_path / "run"
    code = main(["train", "--config", str(config), "--dataset", "synthetic", "--root", root, "--model", "swinunet",
                 "--patch-size", "64", "64", "--num-classes", "4", "--labeled-num", "2", "--batch-size", "4",
                 "--labeled-bs", "2", "--max-iterations", "2", "--val-every", "0", "--no-progress",
                 "--num-workers", "0", "--no-test", "--pretrained", weights, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    ckpt = load(str(out / "checkpoints" / "last.pt"))
    assert ckpt["model_config"]["arch"] == "swinunet"
    assert ckpt["model_config"]["backbone_options"] == {"embed_dim": 12, "num_heads": [1, 2, 3, 6], "window_size": 4}
    assert ckpt["config"]["pretrained"] == weights
    net = backbone_from_checkpoint(ckpt)  # rebuilt for the recorded patch, without the initial weights
    assert net.swin_unet.img_size == (64, 64)
    assert net(torch.randn(1, 1, 64, 64)).shape == (1, 4, 64, 64)
    code = main(["train", "--dataset", "synthetic", "--root", root, "--model", "swinunet", "--patch-size", "64", "64",
                 "--num-classes", "4", "--pretrained", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "r2")])
    err = capsys.readouterr().err
    assert code == 2 and "--pretrained" in err and "nope.pth" in err and "not found" in err, err


# -- the published recipe -------------------------------------------------------------------------


def test_published_recipe(tmp_path):
    import re

    import yaml

    from icl import checkpoint as C
    from icl.data import make_synthetic
    from icl.train import TrainConfig, train

    path = os.path.join(os.path.dirname(DATA), "..", "configs", "acdc_2d_swinunet_published.yaml")
    text = open(path).read()
    raw = yaml.safe_load(text)
    cfg = TrainConfig.from_dict(raw, origin="recipe")
    assert (cfg.model, cfg.patch_size, cfg.model_options, cfg.pretrained) == ("swinunet", [224, 224], None, None)
    assert (cfg.base_lr, cfg.max_iterations, cfg.batch_size, cfg.labeled_bs, cfg.seed) == (0.1, 30000, 16, 8, 1337)
    assert (cfg.mixer, cfg.faithful, cfg.global_queries, cfg.max_mixer_params) == ("mlp", True, "batch", None)
    assert tuple(cfg.loss_weights[k] for k in ("supervised", "auxiliary", "pseudo", "consistency")) == (1, 1, 1, 50)
    assert (cfg.interpolation, cfg.fill, cfg.momentum, cfg.weight_decay) == ("nearest", "zero", 0.9, 1e-4)
    header = " ".join(l.lstrip("#").strip() for l in text.splitlines() if l.startswith("#"))
    numbers = [int(n.replace(",", "")) for n in re.findall(r"(\d{1,3}(?:,\d{3})+)", header)]
    with torch.device("meta"):
        net = build_model("swinunet", 1, 4, (224, 224), mixer="mlp", faithful=True, max_mixer_params=None)
    mixers = sum(p.numel() for n, p in net.named_parameters() if ".mlp2." in n or ".norm3." in n)
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert numbers == [mixers, total, sum(p.numel() for p in net.backbone.parameters())]
    gib = float(re.search(r"about ([\d.]+) GiB for parameters", header).group(1))
    assert abs(gib - (total + 2 * trainable) * 4 / 2 ** 30) < 0.05
    # the recipe as written, smaller
    raw.update(root=make_synthetic(str(tmp_path / "data"), "acdc", num_train=4, seed=0)["root"],
               out=str(tmp_path / "run"), patch_size=[64, 64], model_options=SMALL, max_iterations=2, batch_size=4,
               labeled_bs=2, labeled_num=None, labeled_fraction=0.5, val_every=2, save_every=0, num_workers=0,
               progress=False, num_overlays=0)
    assert train(raw).iteration == 2
    ck = C.load(str(tmp_path / "run" / "checkpoints" / "last.pt"))
    assert ck["model_config"]["arch"] == "swinunet" and any(".mlp2." in k for k in ck["model"])
    assert not any(".proj_layers." in k or ".norm_layers." in k for k in ck["model"])  # raw tokens, as published
