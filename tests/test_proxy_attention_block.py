"""ProxyAttention's fused path as one autograd node (icl_kernels/ops/proxy_attention_block.py):
gradients against the published module in float64 and by gradcheck, partial
gradient requests, the C++ pieces bitwise equal to their Python twins, autocast,
tracing, and its dispatch count against the published module's."""
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import icl_kernels
from attention_helpers import randomize
from icl_kernels import ProxyAttention, _extension
from icl_kernels.ops import proxy_attention_block as blk
from icl_kernels.ops.proxy_attention import resolve_kernels
from icl_kernels.published import Query_Attention

needs_ext = pytest.mark.skipif(not _extension.is_loaded(), reason="compiled extension not built")
BACKENDS = ["cpu", "torch"] if _extension.is_loaded() else ["torch"]


class Published(nn.Module):
    """LayerNorm of the tokens, then the published attention (what ProxyAttention(token_norm=True) computes)."""

    def __init__(self, dim, heads, qkv_bias=True, official=True, norm_kwargs=None, qk_scale=None):
        super().__init__()
        self.norm_x = nn.LayerNorm(dim, **(norm_kwargs or {})) if norm_kwargs is not None else None
        self.attn = Query_Attention(dim, heads, qkv_bias=qkv_bias, qk_scale=qk_scale, standard_layout=not official)

    def forward(self, q, x):
        return self.attn(q, self.norm_x(x) if self.norm_x is not None else x)


def pair(dim, heads, qkv_bias=True, official=True, norm_kwargs=None, backend="cpu", qk_scale=None):
    """(published, fused) with the same float64 parameters."""
    ref = randomize(Published(dim, heads, qkv_bias, official, norm_kwargs, qk_scale).double())
    mod = ProxyAttention(dim, heads, qkv_bias=qkv_bias, qk_scale=qk_scale, official_layout=official,
                         token_norm=norm_kwargs is not None, backend=backend).double()
    if norm_kwargs is not None:
        mod.norm_x = nn.LayerNorm(dim, **norm_kwargs).double()
        mod.norm_x.load_state_dict(ref.norm_x.state_dict())
    mod.fc_q.load_state_dict(ref.attn.fc_q.state_dict())
    mod.fc_kv.load_state_dict(ref.attn.fc_kv.state_dict())
    mod.proj.load_state_dict(ref.attn.proj.state_dict())
    return ref, mod


def grads_of(module, q, x, w_out, w_attn, wrt):
    module.zero_grad(set_to_none=True)
    q = q.detach().clone().requires_grad_("q" in wrt)
    x = x.detach().clone().requires_grad_("x" in wrt)
    out, attn = module(q, x)
    loss = 0
    if w_out is not None:
        loss = loss + (out * w_out).sum()
    if w_attn is not None:
        loss = loss + (attn * w_attn).sum()
    loss.backward()
    named = {"q": q.grad, "x": x.grad}
    for name, p in module.named_parameters():
        named[name.replace("attn.", "")] = p.grad
    return out.detach(), attn.detach(), named


NORMS = {"ln": {}, "ln-no-bias": {"bias": False}, "ln-no-affine": {"elementwise_affine": False}, "none": None}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("official", [True, False], ids=["official", "standard"])
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("qkv_bias", [True, False], ids=["bias", "nobias"])
def test_values_and_every_gradient_against_published(backend, official, norm, qkv_bias):
    dim, heads, K, N, B = 24, 3, 5, 37, 2   # C not a power of two, N odd
    ref, mod = pair(dim, heads, qkv_bias, official, NORMS[norm], backend, qk_scale=0.41)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, K, dim, generator=g, dtype=torch.float64)
    x = (torch.randn(B, dim, N, generator=g, dtype=torch.float64) * 2 + 0.5).transpose(1, 2)  # strided tokens
    w_out = torch.randn(B, K, dim, generator=g, dtype=torch.float64)
    w_attn = torch.randn(B, K, heads, N, generator=g, dtype=torch.float64)
    o_r, a_r, g_r = grads_of(ref, q, x, w_out, w_attn, "qx")
    o, a, gr = grads_of(mod, q, x, w_out, w_attn, "qx")
    torch.testing.assert_close(o, o_r, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(a, a_r, rtol=1e-10, atol=1e-11)
    assert set(gr) == set(g_r)
    for name, want in g_r.items():
        torch.testing.assert_close(gr[name], want, rtol=1e-9, atol=1e-10, msg=name)
    assert gr["x"].stride() == x.stride()  # dx keeps the tokens' layout


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["out-only", "attn-only", "params-frozen", "x-only"])
def test_partial_gradient_requests(backend, which):
    """Unused outputs (None gradients), frozen parameters and inputs without grad."""
    ref, mod = pair(16, 2, official=True, norm_kwargs={}, backend=backend)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 3, 16, generator=g, dtype=torch.float64)   # batch 1
    x = torch.randn(1, 50, 16, generator=g, dtype=torch.float64)
    w_out = torch.randn(1, 3, 16, generator=g, dtype=torch.float64)
    w_attn = torch.randn(1, 3, 2, 50, generator=g, dtype=torch.float64)
    wrt = "qx"
    if which == "out-only":
        w_attn = None
    elif which == "attn-only":
        w_out = None
    elif which == "x-only":
        wrt = "x"
    if which in ("params-frozen", "x-only"):
        for m in (ref, mod):
            for p in m.parameters():
                p.requires_grad_(False)
    _, _, g_r = grads_of(ref, q, x, w_out, w_attn, wrt)
    _, _, gr = grads_of(mod, q, x, w_out, w_attn, wrt)
    for name, want in g_r.items():
        if want is None:
            assert gr[name] is None or not gr[name].abs().any(), name
        else:
            torch.testing.assert_close(gr[name], want, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("official", [True, False], ids=["official", "standard"])
def test_gradcheck_float64(backend, official):
    mod = randomize(ProxyAttention(8, 2, official_layout=official, token_norm=True, backend=backend).double())
    params = [mod.fc_q.weight, mod.fc_q.bias, mod.fc_kv.weight, mod.fc_kv.bias, mod.norm_x.weight, mod.norm_x.bias,
              mod.proj.weight, mod.proj.bias]
    q = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)

    def f(q, x, *ps):
        kern = resolve_kernels(backend, x)
        return blk.proxy_attention_block(q, x, ps[0], ps[1], ps[2], ps[3], ps[4], ps[5], ps[6], ps[7],
                                         2, official, mod.scale, 1e-5, kern)

    assert torch.autograd.gradcheck(f, (q, x, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_autograd_node_and_empty_classes(backend):
    mod = ProxyAttention(16, 4, official_layout=True, token_norm=True, backend=backend)
    q = torch.randn(2, 3, 16, requires_grad=True)
    x = torch.randn(2, 20, 16, requires_grad=True)
    out, attn = mod(q, x)
    # one node makes both outputs, straight from the leaves (no graph of small ops)
    node = out.grad_fn
    assert attn.grad_fn is node
    want = "BlockFunction" if _extension.is_loaded() else "ProxyAttentionBlockBackward"
    assert want in node.name() or type(node).__name__ == want, node.name()
    leaves = [f for f, _ in node.next_functions if f is not None]
    assert len(leaves) == 10 and all(type(f).__name__ == "AccumulateGrad" for f in leaves)
    # K = 0 classes: empty outputs, zero gradients
    out0, attn0 = mod(torch.randn(2, 0, 16, requires_grad=True), x)
    assert out0.shape == (2, 0, 16) and attn0.shape == (2, 0, 4, 20)
    (out0.sum() + attn0.sum()).backward()
    assert x.grad is not None and not x.grad.abs().any()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("official", [True, False])
@pytest.mark.parametrize("variant", ["full", "no-bias", "no-affine", "no-beta"])
def test_cpp_pieces_bitwise_equal_python_twins(dtype, official, variant):
    torch.manual_seed(0)
    B, K, C, H = 2, 3, 12, 3
    M = H * K
    opt = lambda *shape: torch.randn(*shape, dtype=dtype)  # noqa: E731
    q = torch.randn(B, K, C, dtype=dtype).transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous q
    Wq, Wkv, Wp = opt(C, C), opt(2 * C, C), opt(C, C)
    bq, bkv, bp = (None, None, None) if variant == "no-bias" else (opt(C), opt(2 * C), opt(C))
    gamma = None if variant == "no-affine" else opt(C)
    beta = None if variant in ("no-affine", "no-beta") else opt(C)
    mask = blk.head_mask(K, H, official, q.device, dtype, cache=False)
    ops = torch.ops.icl_kernels
    py = blk.fold(q, Wq, bq, Wkv, bkv, gamma, beta, mask, 0.37, dtype)
    cc = ops._proxy_block_fold(q, Wq, bq, Wkv, bkv, gamma, beta, mask, 0.37, dtype)
    _equal(py, cc)
    q2, Qe, Wk_f, v, A, c = py
    Z = torch.randn(B, M, C, dtype=dtype)
    py_u = blk.unfold(Z, Wkv, bkv, gamma, beta, Wp, bp, mask, official)
    _equal(py_u, ops._proxy_block_unfold(Z, Wkv, bkv, gamma, beta, Wp, bp, mask, official))
    Zc, Zt, O, _ = py_u
    d_out = torch.randn(B, C, K, dtype=dtype).transpose(1, 2)  # non-contiguous gradient
    py_ub = blk.unfold_backward(d_out, Zc, Zt, O, Wkv, gamma, Wp, mask, dtype)
    _equal(py_ub, ops._proxy_block_unfold_backward(d_out, Zc, Zt, O, Wkv, gamma, Wp, mask, dtype))
    _, _, _, dWv, dbv, dgamma, dbeta = py_ub
    dA, dc = torch.randn(B, M, C, dtype=dtype), torch.randn(B, M, dtype=dtype)
    for extra in ((dWv, dbv, dgamma if gamma is not None else None, dbeta), (None, None, None, None)):
        args = (dA, dc, q2, Qe, Wq, Wkv, Wk_f, v, gamma, beta, mask, official, 0.37) + extra
        _equal(blk.fold_backward(*args), ops._proxy_block_fold_backward(*args))


def _equal(a, b):
    assert len(a) == len(b)
    for i, (s, t) in enumerate(zip(a, b)):
        assert s.shape == t.shape and s.dtype == t.dtype, i
        assert torch.equal(s, t), f"output {i} differs by {(s - t).abs().max().item()}"


@needs_ext
def test_python_pieces_give_the_same_module(monkeypatch):
    """Without the extension the module runs the Python twins: the same bits."""
    mod = randomize(ProxyAttention(16, 4, token_norm=True, official_layout=True, backend="torch"))
    q, x = torch.randn(2, 3, 16), torch.randn(2, 30, 16)
    want = mod(q, x)
    monkeypatch.setattr(blk, "_FOLD", blk.fold)
    monkeypatch.setattr(blk, "_UNFOLD", blk.unfold)
    got = mod(q, x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_autocast_runs_folding_in_parameter_dtype():
    """Under autocast the K-sized products stay in float32 and the tokens' kernel in their dtype."""
    mod = randomize(ProxyAttention(32, 4, token_norm=True, official_layout=True, backend="torch"))
    q = torch.randn(2, 4, 32, requires_grad=True)
    x = torch.randn(2, 40, 32, requires_grad=True)
    want_out, want_attn = mod(q, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, attn = mod(q, x)
    assert out.dtype == torch.float32 and attn.dtype == torch.float32
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)  # float32 tokens: nothing ran in bfloat16
    (out.sum() + attn.sum()).backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in mod.parameters())
    xb = x.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_b, attn_b = mod(q, xb)
    assert attn_b.dtype == torch.bfloat16 and out_b.dtype == torch.float32
    (out_b.sum() + attn_b.float().sum()).backward()
    assert xb.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_tensors_and_compile_fullgraph(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mod = ProxyAttention(16, 2, token_norm=True, official_layout=False, backend=backend)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out, attn = mod(torch.randn(2, 3, 16), torch.randn(2, 9, 16))
        assert out.shape == (2, 3, 16) and attn.shape == (2, 3, 2, 9)
    torch._dynamo.reset()
    q, x = torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 9, 16, requires_grad=True)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    (o_c, a_c), (o_e, a_e) = compiled(q, x), mod(q, x)
    torch.testing.assert_close(o_c, o_e)
    torch.testing.assert_close(a_c, a_e)
    gq_c, gw_c = torch.autograd.grad(o_c.sum() + a_c.square().sum(), (q, mod.fc_kv.weight))
    gq_e, gw_e = torch.autograd.grad(o_e.sum() + a_e.square().sum(), (q, mod.fc_kv.weight))
    torch.testing.assert_close(gq_c, gq_e)
    torch.testing.assert_close(gw_c, gw_e)


@needs_ext
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("official", [True, False])
@pytest.mark.parametrize("token_norm", [True, False])
def test_cpp_node_bitwise_equals_python_function(monkeypatch, backend, official, token_norm):
    """The C++ autograd node and the Python Function (what runs without the
    extension) over the same kernels and pieces: the same bits, forward and backward."""
    results = []
    for node in (True, False):
        monkeypatch.setattr(icl_kernels.nn, "block_node_available", lambda node=node: node)
        if not node:  # as without the extension: the Python Function over the Python pieces
            for name, fn in (("_FOLD", blk.fold), ("_UNFOLD", blk.unfold), ("_UNFOLD_BACKWARD", blk.unfold_backward),
                             ("_FOLD_BACKWARD", blk.fold_backward)):
                monkeypatch.setattr(blk, name, fn)
        mod = randomize(ProxyAttention(24, 3, token_norm=token_norm, official_layout=official, backend=backend))
        g = torch.Generator().manual_seed(4)
        q = torch.randn(2, 5, 24, generator=g, requires_grad=True)
        x = torch.randn(2, 24, 41, generator=g).transpose(1, 2).requires_grad_()
        out, attn = mod(q, x)
        w = torch.randn(attn.shape, generator=g)
        (out.square().sum() + (attn * w).sum()).backward()
        node = out.grad_fn.name()
        results.append([node, out, attn, q.grad, x.grad] + [p.grad for p in mod.parameters()])
    cpp, py = results
    assert "BlockFunction" in cpp[0] and "ProxyAttentionBlock" in py[0]
    for a, b in zip(cpp[1:], py[1:]):
        assert torch.equal(a, b)


@needs_ext
def test_opcheck_block_node():
    torch.manual_seed(0)
    mod = randomize(ProxyAttention(8, 2, token_norm=True, official_layout=True, backend="cpu"))
    q, x = torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 8, 11).transpose(1, 2).requires_grad_()
    mask = blk.head_mask(3, 2, True, q.device, q.dtype, cache=False)
    for kernels in ("", "torch"):  # the compiled cpu kernels; a named backend through the registered ops
        args = (q, x, mod.fc_q.weight, mod.fc_q.bias, mod.fc_kv.weight, mod.fc_kv.bias, mod.norm_x.weight,
                mod.norm_x.bias, mod.proj.weight, mod.proj.bias, mask, True, mod.scale, 1e-5, kernels)
        torch.library.opcheck(torch.ops.icl_kernels.proxy_attention_block.default, args)
    no_bias = (q, x, mod.fc_q.weight, None, mod.fc_kv.weight, None, None, None, mod.proj.weight, None, mask, True,
               mod.scale, None, "")
    torch.library.opcheck(torch.ops.icl_kernels.proxy_attention_block.default, no_bias)


@needs_ext
def test_opcheck_pieces():
    torch.manual_seed(0)
    B, K, C, H = 2, 3, 8, 2
    q, Wq, Wkv, Wp = torch.randn(B, K, C), torch.randn(C, C), torch.randn(2 * C, C), torch.randn(C, C)
    bq, bkv, bp, gamma, beta = torch.randn(C), torch.randn(2 * C), torch.randn(C), torch.randn(C), torch.randn(C)
    mask = blk.head_mask(K, H, True, q.device, q.dtype, cache=False)
    ops = torch.ops.icl_kernels
    torch.library.opcheck(ops._proxy_block_fold.default, (q, Wq, bq, Wkv, bkv, gamma, beta, mask, 0.5, torch.float32))
    Z = torch.randn(B, H * K, C)
    torch.library.opcheck(ops._proxy_block_unfold.default, (Z, Wkv, bkv, gamma, beta, Wp, bp, mask, True))


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(module, q, x):
    out, attn = module(q, x)  # warm: caches filled
    (out.sum() + attn.sum()).backward()
    with _Count() as mode:
        out, attn = module(q, x)
        (out.sum() + attn.sum()).backward()
    return sum(mode.ops.values())


@needs_ext
def test_dispatches_no_more_ops_than_published():
    """The module's forward+backward dispatches fewer ATen ops than LayerNorm + the published module."""
    B, K, C, H, N = 2, 4, 32, 4, 64
    ref, mod = pair(C, H, norm_kwargs={}, backend="cpu")
    q = torch.randn(B, K, C, dtype=torch.float64, requires_grad=True)
    x = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
    published, fused = count_ops(ref, q, x), count_ops(mod, q, x)
    assert fused < published, (fused, published)


@needs_ext
def test_compiled_module_runs_the_cpp_node():
    """Under torch.compile the compiled backends take the same C++ node as eager calls
    (the backend choice is a trace-time constant: no graph break)."""
    import icl_kernels.nn as icl_nn

    probe = torch.compiler.assume_constant_result(lambda: 0)
    assert getattr(probe, "_dynamo_marked_constant", False) and icl_nn._traced_node_kernels._dynamo_marked_constant
    torch._dynamo.reset()
    mod = ProxyAttention(16, 2, token_norm=True, official_layout=True, backend="cpu")
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    q, x = torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 9, 16, requires_grad=True)
    torch.compile(mod, fullgraph=True, backend=backend)(q, x)
    assert any("proxy_attention_block" in t for t in targets), targets


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_with_dynamic_shapes(backend):
    """dynamic=True (what a recompile for a new token count turns on): N and B symbolic."""
    torch._dynamo.reset()
    mod = ProxyAttention(16, 2, token_norm=True, official_layout=True, backend=backend)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager", dynamic=True)
    for B, N in ((2, 9), (3, 20)):
        q, x = torch.randn(B, 3, 16, requires_grad=True), torch.randn(B, N, 16, requires_grad=True)
        (o_c, a_c), (o_e, a_e) = compiled(q, x), mod(q, x)
        torch.testing.assert_close(o_c, o_e)
        torch.testing.assert_close(a_c, a_e)
        gx_c, = torch.autograd.grad(o_c.sum() + a_c.square().sum(), x)
        gx_e, = torch.autograd.grad(o_e.sum() + a_e.square().sum(), x)
        torch.testing.assert_close(gx_c, gx_e)
