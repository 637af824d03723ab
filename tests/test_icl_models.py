"""Tests of icl.models: backbones, ICLHead, ICLNet, build_model (tiny CPU sizes)."""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import icl_kernels
from icl_kernels.published import Query_Attention
from icl.models import ClassDecoder, ICLHead, UNet2D, UNet3D, build_model, class_presence



pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- transcription of the published keys
def _conv(prefix, cin, cout, k, dims, bias=True):
    out = {f"{prefix}.weight": (cout, cin) + (k,) * dims}
    if bias:
        out[f"{prefix}.bias"] = (cout,)
    return out


def _bn(prefix, c):
    return {
        f"{prefix}.weight": (c,),
        f"{prefix}.bias": (c,),
        f"{prefix}.running_mean": (c,),
        f"{prefix}.running_var": (c,),
        f"{prefix}.num_batches_tracked": (),
    }


def _published_unet2d_keys(cin, K):
    """Keys/shapes of UNet_icl's encoder/decoder (code/networks/unet_icl.py).

    The published Decoder builds its UpBlocks without passing ``bilinear``, so each
    holds a 1x1 conv (``conv1x1``) and a parameter-free bilinear upsampler.
    """
    ch = [16, 32, 64, 128, 256]
    keys = {}

    def conv_block(prefix, a, b):
        keys.update(_conv(f"{prefix}.conv_conv.0", a, b, 3, 2))
        keys.update(_bn(f"{prefix}.conv_conv.1", b))
        keys.update(_conv(f"{prefix}.conv_conv.4", b, b, 3, 2))
        keys.update(_bn(f"{prefix}.conv_conv.5", b))

    conv_block("encoder.in_conv", cin, ch[0])
    for i in range(1, 5):
        conv_block(f"encoder.down{i}.maxpool_conv.1", ch[i - 1], ch[i])
    for i in range(1, 5):
        a, b = ch[5 - i], ch[4 - i]
        keys.update(_conv(f"decoder.up{i}.conv1x1", a, b, 1, 2))
        conv_block(f"decoder.up{i}.conv", 2 * b, b)
    keys.update(_conv("decoder.out_conv", ch[0], K, 3, 2))
    return keys


def _published_unet3d_keys(cin, K):
    """Keys/shapes of unet_3D_icl without sspa/uscl (UnetConv3 with InstanceNorm: no norm keys)."""
    f = [16, 32, 64, 128, 256]
    keys = {}

    def unet_conv3(prefix, a, b):
        keys.update(_conv(f"{prefix}.conv1.0", a, b, 3, 3))
        keys.update(_conv(f"{prefix}.conv2.0", b, b, 3, 3))

    unet_conv3("conv1", cin, f[0])
    for i in range(1, 4):
        unet_conv3(f"conv{i + 1}", f[i - 1], f[i])
    unet_conv3("center", f[3], f[4])
    for i, (a, b) in zip((4, 3, 2, 1), ((f[4], f[3]), (f[3], f[2]), (f[2], f[1]), (f[1], f[0]))):
        unet_conv3(f"up_concat{i}.conv", a + b, b)
    keys.update(_conv("final", f[0], K, 1, 3))
    return keys


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_unet2d_state_dict_matches_published():
    assert _shapes(UNet2D(1, 4)) == _published_unet2d_keys(1, 4)
    assert _shapes(UNet2D(3, 2)) == _published_unet2d_keys(3, 2)


def _published_unet2d_forward(sd, x):
    """The published 2D UNet as it executes in eval mode, written out functionally
    from a state_dict (conv -> BN(running stats) -> LeakyReLU(0.01) twice per block,
    max-pool down, up = 1x1 conv then bilinear x2 with align_corners=True, concat
    [skip, up]). Returns (logits, [x_1, x_2, x_3])."""

    def block(prefix, t):
        for conv, bn in ((0, 1), (4, 5)):
            t = F.conv2d(t, sd[f"{prefix}.conv_conv.{conv}.weight"], sd[f"{prefix}.conv_conv.{conv}.bias"], padding=1)
            t = F.batch_norm(t, sd[f"{prefix}.conv_conv.{bn}.running_mean"], sd[f"{prefix}.conv_conv.{bn}.running_var"],
                             sd[f"{prefix}.conv_conv.{bn}.weight"], sd[f"{prefix}.conv_conv.{bn}.bias"], False, 0.0, 1e-5)
            t = F.leaky_relu(t, 0.01)
        return t

    enc = [block("encoder.in_conv", x)]
    for i in range(1, 5):
        enc.append(block(f"encoder.down{i}.maxpool_conv.1", F.max_pool2d(enc[-1], 2)))
    t, feats = enc[4], []
    for i in range(1, 5):
        t = F.conv2d(t, sd[f"decoder.up{i}.conv1x1.weight"], sd[f"decoder.up{i}.conv1x1.bias"])
        t = F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True)
        t = block(f"decoder.up{i}.conv", torch.cat([enc[4 - i], t], dim=1))
        feats.append(t)
    logits = F.conv2d(t, sd["decoder.out_conv.weight"], sd["decoder.out_conv.bias"], padding=1)
    return logits, feats[:3]


def test_unet2d_forward_matches_published_float64():
    torch.manual_seed(0)
    net = UNet2D(2, 3).double()
    with torch.no_grad():  # non-trivial BN statistics and affines, so BN placement matters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    net.eval()
    x = torch.randn(2, 2, 48, 32, dtype=torch.float64)
    logits, feats = net(x, return_features=True)
    ref_logits, ref_feats = _published_unet2d_forward(net.state_dict(), x)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-12)
    for f, r in zip(feats, ref_feats):
        torch.testing.assert_close(f, r, rtol=0, atol=1e-12)
    # the transcription is sensitive to the upsampling corners: a model that used
    # align_corners=False would not pass the comparison above
    t = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    assert not torch.allclose(F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True),
                              F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False))


def test_unet2d_parameter_count_matches_published():
    # 1,813,764 for the published UNet_icl backbone (1 input channel, 4 classes)
    assert sum(p.numel() for p in UNet2D(1, 4).parameters()) == 1_813_764


def test_unet3d_state_dict_matches_published():
    assert _shapes(UNet3D(1, 2)) == _published_unet3d_keys(1, 2)


def test_unet2d_shapes_and_features():
    net = UNet2D(1, 4).eval()
    x = torch.randn(2, 1, 32, 48)
    assert net(x).shape == (2, 4, 32, 48)
    logits, feats = net(x, return_features=True)
    assert [tuple(f.shape) for f in feats] == [(2, 128, 4, 6), (2, 64, 8, 12), (2, 32, 16, 24)]
    net.train()
    out = net(x)
    assert isinstance(out, tuple) and len(out[1]) == 3
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.randn(1, 1, 24, 32))


def test_unet3d_shapes_and_features():
    net = UNet3D(1, 3).eval()
    x = torch.randn(1, 1, 16, 32, 16)
    assert net(x).shape == (1, 3, 16, 32, 16)
    _, feats = net(x, return_features=True)
    assert [tuple(f.shape) for f in feats] == [(1, 256, 1, 2, 1), (1, 128, 2, 4, 2), (1, 64, 4, 8, 4)]


# ---------------------------------------------------------------- transcription of the published head
class _PubMLP(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _PubClassDecoder(nn.Module):
    """Published Class_Decoder in eval mode (DropPath = identity)."""

    def __init__(self, dim, n_tokens, heads):
        super().__init__()
        self.norm1, self.norm1_query = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Query_Attention(dim, heads, qkv_bias=True)
        self.norm2, self.mlp = nn.LayerNorm(dim), _PubMLP(dim, 4 * dim)
        self.norm3, self.mlp2 = nn.LayerNorm(n_tokens), _PubMLP(n_tokens, n_tokens)

    def forward(self, q, feat):
        q, attn = self.attn(self.norm1_query(q), self.norm1(feat))
        q = q + q
        q = q + self.mlp(self.norm2(q))
        attn = attn + attn
        attn = attn + self.mlp2(self.norm3(attn))
        return q, attn


class _PubHead(nn.Module):
    """Published InherentConsistent (eval), 2D or 3D, with its module names."""

    def __init__(self, chans, sizes, heads, K, dims):
        super().__init__()
        Conv, BN = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
        self.proj_layers = nn.ModuleList(Conv(c, c, 1) for c in chans)
        self.norm_layers = nn.ModuleList(nn.LayerNorm(c) for c in chans)
        n = [int(torch.tensor(s).prod()) for s in sizes]
        self.class_decoders = nn.ModuleList(_PubClassDecoder(c, m, h) for c, m, h in zip(chans, n, heads))
        self.attn_convs0 = nn.ModuleList(
            nn.Module() for _ in heads
        )
        for mod, h in zip(self.attn_convs0, heads):
            mod.block = nn.Sequential(
                OrderedDict(
                    [
                        ("depthwise", Conv(h, h, 3, padding=1, groups=h, bias=False)),
                        ("bn_depth", BN(h)),
                        ("relu1", nn.ReLU()),
                        ("pointwise", Conv(h, h, 1, bias=False)),
                        ("bn_point", BN(h)),
                        ("relu2", nn.ReLU()),
                    ]
                )
            )
        self.attn_convs1 = nn.ModuleList(Conv(h, 1, 1) for h in heads)
        self.query_convs = nn.ModuleList(nn.Conv1d(c, c // 2, 1) for c in chans)
        self.guided_Q = nn.Parameter(torch.zeros(1, K, chans[0]))

    def forward(self, feats, guided_Q=None):
        maps, qs = [], []
        B = feats[0].shape[0]
        q = self.guided_Q.expand(B, -1, -1) if guided_Q is None else None
        for l, f in enumerate(feats):
            if guided_Q is not None:
                q = guided_Q[l].expand(B, -1, -1)
            tok = self.norm_layers[l](self.proj_layers[l](f).flatten(2).transpose(1, 2))
            upd, attn = self.class_decoders[l](q, tok)
            b, K, H, _ = attn.shape
            a = self.attn_convs0[l].block(attn.reshape(b * K, H, *f.shape[2:]))
            maps.append(self.attn_convs1[l](a).squeeze(1).reshape(b, K, *f.shape[2:]))
            q = self.query_convs[l](upd.permute(0, 2, 1)).permute(0, 2, 1)
            qs.append(upd)
        return maps, qs


def _randomize(module, scale=0.3):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype.is_floating_point:
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * scale)


@pytest.mark.parametrize("dims", [2, 3])
def test_faithful_head_matches_published(dims):
    chans, heads, K = (16, 8), (4, 2), 3
    sizes = [(4, 4), (8, 8)] if dims == 2 else [(2, 2, 2), (4, 4, 4)]
    ref = _PubHead(chans, sizes, heads, K, dims).double().eval()
    _randomize(ref)
    sd = ref.state_dict()
    sspa = ICLHead(chans, K, heads, sizes, mixer="mlp", faithful=True, spatial_dims=dims).double().eval()
    sspa.load_published_state_dict(sd)
    uscl = ICLHead(chans, K, heads, sizes, mixer="mlp", faithful=True, spatial_dims=dims,
                   learned_queries=False, chain_queries=False).double().eval()
    uscl.load_published_state_dict(sd)  # drops the published unused guided_Q / query convs
    feats = [torch.randn(2, c, *s, dtype=torch.float64) for c, s in zip(chans, sizes)]
    with torch.no_grad():
        m_ref, q_ref = ref(feats)
        m, q = sspa(feats)
        for a, b in zip(m + q, m_ref + q_ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        glob = [t.mean(0, keepdim=True) for t in q_ref]
        m_ref_u, _ = ref(feats, glob)
        m_u, _ = uscl(feats, glob)
        for a, b in zip(m_u, m_ref_u):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("faithful", [False, True])
def test_proxy_attention_in_head_equals_explicit(faithful):
    """The fused attention (token LayerNorm inside the op) equals LayerNorm + the published module."""
    dec = ClassDecoder(16, 4, None, mixer="conv", faithful=faithful)
    _randomize(dec.attn)
    ref = Query_Attention(16, 4, qkv_bias=True, standard_layout=not faithful)
    ref.load_state_dict({k: v for k, v in dec.attn.state_dict().items() if not k.startswith("norm_x")})
    q, x = torch.randn(2, 3, 16), torch.randn(2, 20, 16)
    out, s = dec.attn(q, x)
    out_ref, s_ref = ref(q, dec.attn.norm_x(x))
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-5)


def test_faithful_doubling_in_eval():
    """faithful=True: q + drop_path(q), attn + drop_path(attn) double both in eval."""
    torch.manual_seed(0)
    a = ClassDecoder(16, 4, None, mixer="conv", faithful=True).eval()
    b = ClassDecoder(16, 4, None, mixer="conv", faithful=False).eval()
    b.load_state_dict(a.state_dict())
    b.attn.official_layout = True  # same head split; only the doubling differs
    with torch.no_grad():  # silence the residual branches to expose the doubling
        for dec in (a, b):
            dec.mlp.fc2.weight.zero_(); dec.mlp.fc2.bias.zero_()
            dec.mixer.dw2.weight.zero_(); dec.mixer.dw2.bias.zero_()
    q, x = torch.randn(2, 3, 16), torch.randn(2, 16, 16)
    qa, sa = a(q, x, (4, 4))
    qb, sb = b(q, x, (4, 4))
    torch.testing.assert_close(sa, 2 * sb)
    torch.testing.assert_close(qa, 2 * qb)


def test_head_on_foreign_features():
    """Plug-and-play: any widths (query convs map C_l -> C_{l+1}), 2 levels, conv mixer."""
    head = ICLHead((40, 24), num_classes=5, num_heads=(4, 2), feature_sizes=None, mixer="conv")
    feats = [torch.randn(3, 40, 6, 5), torch.randn(3, 24, 12, 10)]
    maps, qs = head(feats)
    assert [tuple(m.shape) for m in maps] == [(3, 5, 6, 5), (3, 5, 12, 10)]
    assert [tuple(q.shape) for q in qs] == [(3, 5, 40), (3, 5, 24)]
    # another resolution works with the conv mixer; single query tensor; per-level list
    maps, _ = head([torch.randn(1, 40, 3, 3), torch.randn(1, 24, 7, 7)], torch.randn(1, 5, 40))
    assert maps[1].shape == (1, 5, 7, 7)
    maps, _ = head(feats, [torch.randn(1, 5, 40), torch.randn(3, 5, 24)])
    assert maps[0].shape == (3, 5, 6, 5)
    with pytest.raises(ValueError, match="queries must be"):
        head(feats, torch.randn(2, 5, 40))


def test_mlp_mixer_size_error_and_budget():
    head = ICLHead((16,), 3, (2,), feature_sizes=[(4, 4)], mixer="mlp")
    head([torch.randn(1, 16, 4, 4)])
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        head([torch.randn(1, 16, 8, 8)])
    with pytest.raises(ValueError, match="feature_sizes"):
        ICLHead((16,), 3, (2,), mixer="mlp")
    # the published 2D configuration at 256x256: 572.6 M mixer parameters per head
    with pytest.raises(ValueError, match=r"mixer='conv'") as err:
        ICLHead((128, 64, 32), 4, (8, 4, 2), [(32, 32), (64, 64), (128, 128)], mixer="mlp")
    assert "572,608,512" in str(err.value)


def test_build_model_patch_error():
    with pytest.raises(ValueError, match="patch_size"):
        build_model("unet2d", 1, 4, (40, 32), global_queries="batch")
    with pytest.raises(ValueError, match="patch_size"):
        build_model("unet3d", 1, 2, (32, 32, 24), global_queries="batch")


def _tiny_step(model, labels, K):
    from icl.losses import icl_losses

    x_lab = torch.randn(labels.shape[0], 1, *labels.shape[1:])
    x_unlab = torch.randn(labels.shape[0], 1, *labels.shape[1:])
    out = model.forward_train(x_lab, x_unlab, labels)
    loss = icl_losses(out, labels, K)["total"]
    loss.backward()
    return out


def _check_outputs(out, B, K, sizes, spatial):
    assert out.logits_lab.shape == (B, K, *spatial) and out.logits_unlab.shape == (B, K, *spatial)
    for maps in (out.maps_lab, out.maps_unlab, out.maps_unlab_sspa):
        assert [tuple(m.shape) for m in maps] == [(B, K, *s) for s in sizes]


def _grad_norm(module):
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_iclnet_batch_mode_2d_shapes_and_gradients():
    torch.manual_seed(0)
    model = build_model("unet2d", 1, 4, (32, 32), global_queries="batch").train()
    labels = torch.randint(0, 4, (2, 32, 32))
    out = _tiny_step(model, labels, 4)
    _check_outputs(out, 2, 4, [(4, 4), (8, 8), (16, 16)], (32, 32))
    assert _grad_norm(model.backbone) > 0
    assert _grad_norm(model.sspa) > 0 and _grad_norm(model.uscl) > 0
    assert model.sspa.guided_Q.grad is not None and model.sspa.guided_Q.grad.abs().sum() > 0
    # batch mode: USCL's queries come from SSPA with gradients (the published flow)
    assert model.sspa.class_decoders[2].mlp.fc2.weight.grad is not None
    model.eval()
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 4, 32, 32)


def test_iclnet_faithful_3d_shapes():
    torch.manual_seed(0)
    model = build_model("unet3d", 1, 2, (16, 16, 32), mixer="mlp", faithful=True, global_queries="batch")
    out = _tiny_step(model.train(), torch.randint(0, 2, (1, 16, 16, 32)), 2)
    _check_outputs(out, 1, 2, [(1, 1, 2), (2, 2, 4), (4, 4, 8)], (16, 16, 32))
    assert _grad_norm(model.uscl) > 0


def test_backbone_state_dict_loads_into_fresh_unet():
    model = build_model("unet2d", 1, 4, (32, 32), global_queries="batch")
    _randomize(model.backbone, 0.05)
    fresh = UNet2D(1, 4)
    fresh.load_state_dict(model.backbone_state_dict(), strict=True)
    model.eval(); fresh.eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    assert not any(k.startswith(("sspa", "uscl", "memories")) for k in model.backbone_state_dict())


def test_class_presence():
    labels = torch.tensor([[[0, 0], [2, 2]], [[1, 1], [1, 1]]])
    torch.testing.assert_close(class_presence(labels, 3), torch.tensor([[1.0, 0, 1], [0, 1, 0]]))


class _StubMemory(nn.Module):
    """Records what ICLNet passes to PrototypeMemory."""

    def __init__(self, num_classes, dim, momentum=0.99):
        super().__init__()
        self.register_buffer("protos", torch.zeros(num_classes, dim))
        self.calls = []

    def update(self, values, weights=None):
        self.calls.append((values.clone(), None if weights is None else weights.clone(), torch.is_grad_enabled()))

    def forward(self):
        return self.protos


def test_memory_mode_passes_presence_weights(monkeypatch):
    monkeypatch.setattr(icl_kernels, "PrototypeMemory", _StubMemory, raising=False)
    model = build_model("unet2d", 1, 3, (16, 16), global_queries="memory").train()
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[0, :4] = 2
    out = _tiny_step(model, labels, 3)
    assert [m.protos.shape[1] for m in model.memories] == [128, 64, 32]
    for mem, q in zip(model.memories, out.queries_lab):
        (values, weights, grad_on), = mem.calls
        assert not grad_on and not values.requires_grad
        torch.testing.assert_close(values, q.detach())
        torch.testing.assert_close(weights, torch.tensor([[1.0, 0, 1], [1.0, 0, 0]]))
    # prototypes are used detached: no gradient reaches SSPA through USCL's queries
    assert model.sspa.class_decoders[2].mlp.fc2.weight.grad is None
    model.eval()
    with torch.no_grad():
        model.forward_train(torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16), labels[:1])
    assert all(len(m.calls) == 1 for m in model.memories)  # no update outside training mode


def test_memory_mode_updates_only_present_classes():
    torch.manual_seed(0)
    model = build_model("unet2d", 1, 4, (16, 16), global_queries="memory").train()
    before = [m().clone() for m in model.memories]
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[1, 3:9, 2:7] = 2
    out = _tiny_step(model, labels, 4)
    _check_outputs(out, 2, 4, [(2, 2), (4, 4), (8, 8)], (16, 16))
    for mem, old in zip(model.memories, before):
        new = mem()
        assert not torch.equal(new[0], old[0]) and not torch.equal(new[2], old[2])
        torch.testing.assert_close(new[1], old[1])
        torch.testing.assert_close(new[3], old[3])
    assert _grad_norm(model.uscl) > 0 and _grad_norm(model.backbone) > 0


def test_iclnet_loads_published_full_state_dict():
    """A published UNet_icl state_dict (backbone + sspa.* + uscl.*) loads into a faithful model."""
    model = build_model("unet2d", 1, 4, (32, 32), mixer="mlp", faithful=True, global_queries="batch")
    pub = _PubHead((128, 64, 32), [(4, 4), (8, 8), (16, 16)], (8, 4, 2), 4, 2)
    _randomize(pub)
    back = UNet2D(1, 4)
    state = dict(back.state_dict())
    state.update({f"sspa.{k}": v for k, v in pub.state_dict().items()})
    state.update({f"uscl.{k}": v for k, v in pub.state_dict().items()})
    model.load_published_state_dict(state)
    torch.testing.assert_close(model.uscl.class_decoders[0].attn.norm_x.weight, pub.class_decoders[0].norm1.weight)
    torch.testing.assert_close(model.sspa.guided_Q, pub.guided_Q)
    assert model.uscl.guided_Q is None and model.uscl.query_convs is None


@pytest.mark.parametrize("mode", ["batch", "memory"])
def test_every_trainable_parameter_gets_a_gradient(mode):
    """DDP without find_unused_parameters needs a gradient for every trainable parameter."""
    model = build_model("unet2d", 1, 3, (16, 16), global_queries=mode).train()
    labels = torch.randint(0, 3, (2, 16, 16))
    _tiny_step(model, labels, 3)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(n.startswith("uscl.") or n.startswith("sspa.class_decoders.2.") for n in frozen)
    assert any(n.startswith("sspa.") for n in frozen) == (mode == "memory")
