"""ProxyAttention against an independent transcription of the published module,
token_norm, dropout fallback and apply_to."""
import copy
import warnings

import pytest
import torch
from torch import nn

import icl_kernels
from attention_helpers import randomize
from icl_kernels import ProxyAttention, apply_to
from icl_kernels.published import Query_Attention

TOL = {torch.float64: 1e-9, torch.float32: 2e-4}


def rel_err(got, want, floor=1e-12):
    got, want = got.double(), want.double()
    return (got - want).norm().item() / (want.norm().item() + floor * want.numel() ** 0.5)


def run_and_grads(module, q, x, seed=3):
    q = q.detach().clone().requires_grad_()
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out, attn = module(q, x)
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    w_attn = torch.randn(attn.shape, generator=g, dtype=torch.float64).to(attn.dtype)
    ((out * w_out).sum() + (attn * w_attn).sum()).backward()
    grads = {"q": q.grad, "x": x.grad}
    for name, p in module.named_parameters():
        grads[name] = p.grad
    return out.detach(), attn.detach(), grads


CONFIGS = [
    # dim, heads, K, N, qkv_bias, qk_scale
    (32, 4, 4, 77, True, None),
    (96, 3, 5, 130, False, None),   # C not a power of two, no qkv bias
    (24, 2, 1, 1, True, 0.37),      # K = 1, N = 1, explicit scale
]


@pytest.mark.parametrize("official_layout", [True, False], ids=["official", "standard"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"dim{c[0]}h{c[1]}K{c[2]}N{c[3]}")
def test_parity_with_published_module(official_layout, dtype, backend, cfg):
    dim, heads, K, N, qkv_bias, qk_scale = cfg
    ref = Query_Attention(dim, heads, qkv_bias=qkv_bias, qk_scale=qk_scale, standard_layout=not official_layout)
    randomize(ref.double())
    mod = ProxyAttention(dim, heads, qkv_bias=qkv_bias, qk_scale=qk_scale, official_layout=official_layout, backend=backend)
    mod = mod.double()
    mod.load_state_dict(ref.state_dict())  # published state_dict keys load unchanged
    assert mod.scale == ref.scale
    g = torch.Generator().manual_seed(1)
    B = 2
    q = torch.randn(B, K, dim, generator=g, dtype=torch.float64)
    x = torch.randn(B, dim, N, generator=g, dtype=torch.float64).transpose(1, 2)
    out_r, attn_r, grads_r = run_and_grads(ref, q, x)
    mod = mod.to(dtype)
    out, attn, grads = run_and_grads(mod, q.to(dtype), x.to(dtype))
    tol = TOL[dtype]
    assert out.shape == out_r.shape and attn.shape == attn_r.shape == (B, K, heads, N)
    assert rel_err(out, out_r) <= tol
    assert rel_err(attn, attn_r) <= tol
    assert set(grads) == set(grads_r)
    for name in grads_r:
        assert rel_err(grads[name], grads_r[name], floor=1e-9) <= tol, name


def test_layouts_really_differ():
    """The published head split is not the standard one (the parity above is not vacuous)."""
    ref_official = randomize(Query_Attention(32, 4, qkv_bias=True).double())
    ref_standard = Query_Attention(32, 4, qkv_bias=True, standard_layout=True).double()
    ref_standard.load_state_dict(ref_official.state_dict())
    q, x = torch.randn(2, 4, 32, dtype=torch.float64), torch.randn(2, 50, 32, dtype=torch.float64)
    assert not torch.allclose(ref_official(q, x)[0], ref_standard(q, x)[0])


@pytest.mark.parametrize("official_layout", [True, False])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_token_norm_equals_layernorm_then_module(official_layout, backend):
    dim, heads = 48, 4
    fused = randomize(ProxyAttention(dim, heads, official_layout=official_layout, token_norm=True, eps=1e-5, backend=backend).double())
    plain = ProxyAttention(dim, heads, official_layout=official_layout, backend="torch").double()
    plain.load_state_dict({k: v for k, v in fused.state_dict().items() if not k.startswith("norm_x")})
    norm = copy.deepcopy(fused.norm_x)

    class LayerNormThenAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm_x, self.attn = norm, plain

        def forward(self, q, x):
            return self.attn(q, self.norm_x(x))

    explicit = LayerNormThenAttention()
    q = torch.randn(2, 4, dim, dtype=torch.float64)
    x = torch.randn(2, 300, dim, dtype=torch.float64) * 3 + 1
    out_r, attn_r, gr = run_and_grads(explicit, q, x)
    out, attn, g = run_and_grads(fused, q, x)
    assert rel_err(out, out_r) <= 1e-9 and rel_err(attn, attn_r) <= 1e-9
    assert rel_err(g["x"], gr["x"]) <= 1e-9 and rel_err(g["q"], gr["q"]) <= 1e-9
    assert rel_err(g["norm_x.weight"], gr["norm_x.weight"]) <= 1e-9
    assert rel_err(g["norm_x.bias"], gr["norm_x.bias"], floor=1e-9) <= 1e-9
    for name in ("fc_q.weight", "fc_kv.weight", "fc_kv.bias", "proj.weight"):
        assert rel_err(g[name], gr["attn." + name], floor=1e-9) <= 1e-9, name


def test_attention_dropout_falls_back_with_one_warning():
    import icl_kernels.nn as icl_nn

    icl_nn._warned_dropout_fallback = False
    mod = ProxyAttention(16, 2, attn_drop=0.5, backend="cpu")
    q, x = torch.randn(2, 3, 16), torch.randn(2, 20, 16)
    with pytest.warns(UserWarning, match="not fused"):
        torch.manual_seed(0)
        out1, _ = mod(q, x)
    torch.manual_seed(0)
    out2, _ = mod.forward_explicit(q, x)
    torch.testing.assert_close(out1, out2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mod(q, x)  # the warning is given once
    mod.eval()  # eval mode: fused path, dropout inactive
    torch.testing.assert_close(mod(q, x)[0], mod.forward_explicit(q, x)[0], rtol=2e-4, atol=1e-5)


def test_module_bad_input():
    with pytest.raises(ValueError, match="num_heads"):
        ProxyAttention(30, 4)
    mod = ProxyAttention(16, 2)
    with pytest.raises(ValueError, match="q must be"):
        mod(torch.randn(2, 3, 8), torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="x must be"):
        mod(torch.randn(2, 3, 16), torch.randn(2, 5))
    with pytest.raises(ValueError, match="batch"):
        mod(torch.randn(2, 3, 16), torch.randn(3, 5, 16))


# -- apply_to ----------------------------------------------------------------------


class ClassDecoder(nn.Module):
    """Shaped like the published block: a Query_Attention among other layers."""

    def __init__(self, dim, heads, qkv_bias=True):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Query_Attention(dim, heads, qkv_bias=qkv_bias, attn_drop=0.0, proj_drop=0.1)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, q, x):
        q, attn = self.attn(q, self.norm(x))
        return self.mlp(q), attn


class TwoLevelModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.levels = nn.ModuleList([ClassDecoder(32, 4), ClassDecoder(16, 2, qkv_bias=False)])
        self.extra = nn.Sequential(Query_Attention(16, 4, qk_scale=0.2))

    def forward(self, q, xs):
        outs = []
        for level, x in zip(self.levels, xs):
            q, attn = level(q, x)
            outs.append(attn)
            q = q[..., :16]  # the next level is 16 wide
        o, a = self.extra[0](q, xs[1])
        return [q, o] + outs + [a]


def test_apply_to_replaces_and_keeps_parameters():
    torch.manual_seed(0)
    model = TwoLevelModel().double().eval()
    q = torch.randn(2, 4, 32, dtype=torch.float64)
    xs = [torch.randn(2, 40, 32, dtype=torch.float64), torch.randn(2, 90, 16, dtype=torch.float64)]
    before = model(q, xs)
    params_before = {name: p for name, p in model.named_parameters()}
    linears_before = model.levels[0].attn.fc_kv
    count = apply_to(model)
    assert count == 3
    assert isinstance(model.levels[0].attn, ProxyAttention)
    assert isinstance(model.extra[0], ProxyAttention)
    assert model.levels[0].attn.fc_kv is linears_before
    assert model.levels[1].attn.fc_q.bias is None
    assert model.levels[0].attn.proj_drop.p == 0.1
    assert model.extra[0].scale == 0.2 and model.extra[0].num_heads == 4
    assert not model.levels[0].attn.training
    params_after = {name: p for name, p in model.named_parameters()}
    assert params_after.keys() == params_before.keys()
    assert all(params_after[k] is params_before[k] for k in params_before)
    after = model(q, xs)
    for a, b in zip(after, before):
        assert rel_err(a, b) <= 1e-9
    assert apply_to(model) == 0


def test_apply_to_keeps_optimizer_state_working():
    torch.manual_seed(0)
    model_a = TwoLevelModel()
    model_b = copy.deepcopy(model_a)
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9)
    q = torch.randn(2, 4, 32)
    xs = [torch.randn(2, 40, 32), torch.randn(2, 90, 16)]

    def step(model, opt):
        model.eval()
        loss = sum(t.square().mean() for t in model(q, xs))
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(model_a, opt_a)
    step(model_b, opt_b)
    apply_to(model_b)  # after the optimizer holds momentum buffers
    for _ in range(2):
        step(model_a, opt_a)
        step(model_b, opt_b)
    for (na, pa), (nb, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert na == nb
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)


def test_apply_to_with_match_and_errors():
    class MyAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc_q, self.fc_kv, self.proj = nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(8, 8)
            self.num_heads, self.scale = 2, 0.5

    model = nn.Sequential(MyAttention(), nn.ReLU())
    assert apply_to(model) == 0  # not the published class name
    assert apply_to(model, match=lambda m: isinstance(m, MyAttention)) == 1
    assert isinstance(model[0], ProxyAttention)

    class Broken(nn.Module):
        pass

    with pytest.raises(ValueError, match="no attribute 'fc_q'"):
        apply_to(nn.Sequential(Broken()), match=lambda m: isinstance(m, Broken))
