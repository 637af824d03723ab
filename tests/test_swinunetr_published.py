"""SwinUNETR with the published SwinUNETR_icl's patch merging (``patch_merging="published"``).

The reference here is a transcription written from the published gather's
offsets (sub-voxel (d, h, w) of each 2^d block, in channel order), not the
published code: 3D (0,0,0) (1,0,0) (0,1,0) (0,0,1) (1,0,1) (0,1,0) (0,0,1)
(1,1,1); 2D (0,0) (1,0) (0,1) (1,1).
"""
import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from icl.models import build_model
from icl.models.registry import build_backbone
from icl.models.swinunetr import PATCH_MERGING, PublishedPatchMerging

try:
    import einops  # noqa: F401
    import monai  # noqa: F401
    from monai.networks.nets import SwinUNETR
    from monai.networks.nets.swin_unetr import PatchMerging as MonaiPatchMerging

    HAS_MONAI = True
except ImportError:  # pragma: no cover
    HAS_MONAI = False

needs_monai = pytest.mark.skipif(not HAS_MONAI, reason="MONAI not installed (pip install 'icl-kernels[monai]')")
pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(feature_size=12, depths=(1, 1, 1, 1))
OFFSETS = {3: [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)],
           2: [(0, 0), (1, 0), (0, 1), (1, 1)]}


def blocks_gather(x, offsets):
    """[B, *S, C] -> [B, *S/2, len(offsets) * C]: split every axis into (S/2, 2), pick each offset."""
    d = x.dim() - 2
    B, C = x.shape[0], x.shape[-1]
    sizes = x.shape[1:-1]
    split = x.reshape(B, *[v for s in sizes for v in (s // 2, 2)], C)
    parts = []
    for off in offsets:
        index = [slice(None)]
        for o in off:
            index += [slice(None), o]
        parts.append(split[tuple(index)])
    assert all(p.shape == (B, *[s // 2 for s in sizes], C) for p in parts) and d == len(offsets[0])
    return torch.cat(parts, dim=-1)


def transcribed_merging(x, merging):
    """The published merging from the offsets, with ``merging``'s own LayerNorm and Linear weights."""
    d = x.dim() - 2
    g = blocks_gather(x, OFFSETS[d])
    g = F.layer_norm(g, g.shape[-1:], merging.norm.weight, merging.norm.bias, merging.norm.eps)
    return g @ merging.reduction.weight.t()


class TranscribedMerging(nn.Module):
    """The transcription as a module MONAI's SwinUNETR accepts as ``downsample``."""

    def __init__(self, dim, norm_layer=nn.LayerNorm, spatial_dims=3):
        super().__init__()
        n = 2 ** spatial_dims
        self.norm = norm_layer(n * dim)
        self.reduction = nn.Linear(n * dim, 2 * dim, bias=False)

    def forward(self, x):
        return transcribed_merging(x, self)


def _randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return module


@pytest.mark.parametrize("dims,shape", [(3, (2, 4, 6, 8, 5)), (2, (3, 6, 10, 7))])
def test_published_merging_is_the_transcription(dims, shape):
    torch.manual_seed(0)
    m = _randomise(PublishedPatchMerging(shape[-1], spatial_dims=dims).double(), 1)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = m(x)
    ref = transcribed_merging(x, m)
    assert y.shape == (shape[0], *[s // 2 for s in shape[1:-1]], 2 * shape[-1])
    torch.testing.assert_close(y, ref, rtol=1e-13, atol=1e-13)
    w = torch.randn_like(y)
    gx, = torch.autograd.grad((y * w).sum(), x)
    gr, = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(gx, gr, rtol=1e-13, atol=1e-13)


def test_published_3d_merging_never_reads_two_sub_voxels():
    """The 3D gather ignores sub-voxels (1,1,0) and (0,1,1) and depends on all six others."""
    m = _randomise(PublishedPatchMerging(3, spatial_dims=3).double(), 2)
    x = torch.randn(1, 4, 4, 4, 3, dtype=torch.float64)
    base = m(x)
    for off, read in [((1, 1, 0), False), ((0, 1, 1), False), ((0, 1, 0), True), ((1, 0, 1), True),
                      ((0, 0, 0), True), ((1, 1, 1), True)]:
        x2 = x.clone()
        x2[(0,) + tuple(slice(o, None, 2) for o in off)] += 1.0
        assert (not torch.equal(m(x2), base)) == read, off


@needs_monai
def test_published_merging_against_monai():
    """3D: another network than MONAI's merging with the same weights; 2D: MONAI reads the same order."""
    torch.manual_seed(0)
    for dims, shape in [(3, (2, 4, 4, 6, 4)), (2, (2, 6, 8, 4))]:
        ours = _randomise(PublishedPatchMerging(4, spatial_dims=dims).double(), 3)
        theirs = MonaiPatchMerging(4, spatial_dims=dims).double()
        theirs.load_state_dict(ours.state_dict(), strict=True)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        x = torch.randn(*shape, dtype=torch.float64)
        diff = (ours(x) - theirs(x)).abs().max().item()
        assert (diff > 1e-3) if dims == 3 else (diff == 0.0), (dims, diff)


def _backbone(merging, dims=3):
    torch.manual_seed(0)
    net = build_backbone("swinunetr", 1, 2, spatial_dims=dims, patch_merging=merging, **TINY).double()
    return net


@needs_monai
def test_published_backbone_forward_and_gradient():
    """patch_merging='published' is MONAI's SwinUNETR with the transcribed merging, and not MONAI's default."""
    pub = _backbone("published")
    mon = _backbone("monai")
    ref = SwinUNETR(in_channels=1, out_channels=2, spatial_dims=3, downsample=TranscribedMerging, **TINY).double()
    plain = SwinUNETR(in_channels=1, out_channels=2, spatial_dims=3, **TINY).double()
    _randomise(pub, 4)
    state = pub.state_dict()
    assert len(state) == len(mon.state_dict())
    for net in (mon, ref, plain):  # strict both ways: same keys and shapes
        net.load_state_dict(state, strict=True)
        pub.load_state_dict(net.state_dict(), strict=True)
    assert sum(isinstance(m, PublishedPatchMerging) for m in pub.modules()) == 4
    assert not any(isinstance(m, PublishedPatchMerging) for m in mon.modules())
    # the default builds MONAI's own merging: the network a plain SwinUNETR is
    assert [type(m) for m in mon.modules()] == [type(m) for m in plain.modules()]
    x = torch.randn(1, 1, 64, 32, 32, dtype=torch.float64)  # the smallest input whose bottleneck has 2 voxels
    outs, grads = {}, {}
    for name, net in [("published", pub), ("monai", mon), ("ref", ref)]:
        net.train()
        net.zero_grad()
        y = net(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        outs[name] = y.detach()
        grads[name] = torch.cat([p.grad.flatten() for _, p in sorted(net.named_parameters())])
    torch.testing.assert_close(outs["published"], outs["ref"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads["published"], grads["ref"], rtol=1e-10, atol=1e-10)
    assert (outs["published"] - outs["monai"]).abs().max() > 1e-3
    assert (grads["published"] - grads["monai"]).abs().max() > 1e-3


@needs_monai
def test_published_backbone_2d_is_monai():
    """In 2D the published merging reads MONAI's order: both modes compute the same network."""
    pub, mon = _backbone("published", 2), _backbone("monai", 2)
    _randomise(pub, 5)
    mon.load_state_dict(pub.state_dict(), strict=True)
    x = torch.randn(2, 1, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(pub.eval()(x), mon.eval()(x))


@needs_monai
def test_icl_model_layout_and_published_state(tmp_path):
    """The option passes through build_model; heads attach as before; a state with SwinUNETR_icl's key
    names (guide_Q, norm1, no backbone. prefix) loads with load_published_state_dict into the same network."""
    kw = dict(in_channels=1, num_classes=2, patch_size=(64, 32, 32), mixer="mlp", faithful=True, **TINY)
    torch.manual_seed(0)
    net = build_model("swinunetr", patch_merging="published", **kw).double()
    base = build_model("swinunetr", **kw).double()
    assert net.feature_tap.names == base.feature_tap.names == ("decoder5", "decoder4", "decoder3")
    assert [(k, v.shape) for k, v in net.state_dict().items()] == [(k, v.shape) for k, v in base.state_dict().items()]
    assert sum(isinstance(m, PublishedPatchMerging) for m in net.backbone.modules()) == 4
    _randomise(net, 6)
    # the published key names of this state: learned queries guide_Q, the block's token LayerNorm norm1
    state = {}
    for k, v in net.state_dict().items():
        k = k.replace(".attn.norm_x.", ".norm1.")
        if k.startswith("backbone."):
            k = k[len("backbone."):]
        state[k.replace("sspa.guided_Q", "sspa.guide_Q")] = v
    assert "sspa.guide_Q" in state
    torch.manual_seed(1)
    again = build_model("swinunetr", patch_merging="published", **kw).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.load_published_state_dict(state, strict=True)
    with pytest.warns(UserWarning, match=r"build it with patch_merging='published'"):
        base.load_published_state_dict(state, strict=True)  # loads into MONAI's merging too: another network
    again.eval(), net.eval()
    x_lab = torch.randn(1, 1, 64, 32, 32, dtype=torch.float64)
    x_unlab = torch.randn(1, 1, 64, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        a, b = again.forward_train(x_lab, x_unlab), net.forward_train(x_lab, x_unlab)
    for name in ("logits_lab", "logits_unlab", "maps_lab", "maps_unlab", "maps_unlab_sspa"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)


def test_unknown_option_values_are_named():
    pytest.importorskip("monai")
    pytest.importorskip("einops")
    with pytest.raises(ValueError, match=r"patch_merging must be one of 'monai', 'published', got 'old'"):
        build_backbone("swinunetr", 1, 2, spatial_dims=3, patch_merging="old", **TINY)
    with pytest.raises(ValueError, match=r"patch_merging='published' and downsample='mergingv2' both choose"):
        build_backbone("swinunetr", 1, 2, spatial_dims=3, patch_merging="published", downsample="mergingv2", **TINY)
    assert PATCH_MERGING == ("monai", "published")


def test_merging_argument_errors():
    with pytest.raises(ValueError, match=r"spatial_dims must be 2 or 3, got 4"):
        PublishedPatchMerging(4, spatial_dims=4)
    with pytest.raises(ValueError, match=r"expected a \[B, 3 spatial axes, C\] tensor, got shape \(2, 4, 4, 3\)"):
        PublishedPatchMerging(3, spatial_dims=3)(torch.zeros(2, 4, 4, 3))


def test_published_recipe_names_the_option():
    """brats_3d_published.yaml's Swin UNETR variant gives patch_merging: published, and no config builds a
    SwinUNETR without it where it claims to be the published run."""
    with open(os.path.join(REPO, "configs", "brats_3d_published.yaml")) as f:
        text = f.read()
    header = " ".join(l.lstrip("#").strip() for l in text.splitlines() if l.startswith("#"))
    found = re.search(r"--model swinunetr` and `model_options: (\{[^}]*\})`", header)
    assert found, "the Swin UNETR variant's model_options are not named in the header"
    opts = yaml.safe_load(found.group(1))
    assert opts == {"feature_size": 48, "patch_merging": "published"}
    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        with open(os.path.join(REPO, "configs", name)) as f:
            raw = yaml.safe_load(f) or {}
        if raw.get("model") == "swinunetr" and "published" in name:
            assert (raw.get("model_options") or {}).get("patch_merging") == "published", name
    if HAS_MONAI:  # the options build the backbone with the recipe's patch
        net = build_backbone("swinunetr", 1, 2, (96, 96, 96), **opts)
        assert sum(isinstance(m, PublishedPatchMerging) for m in net.modules()) == 4


@needs_monai
def test_cli_trains_the_published_network_and_its_checkpoint_rebuilds_it(tmp_path, capsys):
    """icl train with model_options patch_merging: published; the checkpoint rebuilds that network."""
    from icl.checkpoint import backbone_from_checkpoint, load
    from icl.cli import main
    from icl.data import make_synthetic

    root = make_synthetic(str(tmp_path / "data"), "la", num_train=4, seed=0)["root"]
    config = tmp_path / "swin.yaml"
    config.write_text("model: swinunetr\n"
                      "model_options: {feature_size: 12, depths: [1, 1, 1, 1], patch_merging: published}\n")
    out = tmp_path / "run"
    code = main(["train", "--config", str(config), "--dataset", "synthetic", "--root", root, "--num-classes", "2",
                 "--labeled-num", "2", "--patch-size", "32", "64", "32", "--batch-size", "2", "--labeled-bs", "1",
                 "--max-iterations", "1", "--val-every", "0", "--save-every", "0", "--num-workers", "0",
                 "--no-test", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    ckpt = load(str(out / "checkpoints" / "last.pt"))
    assert ckpt["model_config"]["backbone_options"]["patch_merging"] == "published"
    net = backbone_from_checkpoint(ckpt)
    merges = [m for m in net.modules() if isinstance(m, PublishedPatchMerging)]
    assert merges and not any(isinstance(m, MonaiPatchMerging) and not isinstance(m, PublishedPatchMerging)
                              for m in net.modules())
