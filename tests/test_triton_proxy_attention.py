"""The `triton` backend of proxy_attention against the float64 autograd oracle.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest
sets TRITON_INTERPRET=1 before icl_kernels is imported); those tests are kept
small (the interpreter costs ~ms per program instance).  Tests marked `gpu`
run the compiled kernels on CUDA tensors.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import icl_kernels
from icl_kernels import reference as ref
from icl_kernels.backends import BackendUnavailableError

pytest.importorskip("triton")
import icl_kernels.triton as itr  # noqa: E402
from icl_kernels.triton import proxy_attention as tpa  # noqa: E402

KC = tpa.KernelConfig
interp = pytest.mark.skipif(
    not tpa.INTERPRETED, reason="CPU tests need Triton's interpreter (TRITON_INTERPRET=1 before import)"
)
compiled = pytest.mark.skipif(tpa.INTERPRETED, reason="the kernels were defined for the interpreter")

F32_TOL = 2e-4


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def make_inputs(B, N, M, C, *, dtype=torch.float32, device="cpu", transposed=True, seed=0):
    """x (a [B, C, N] buffer viewed as [B, N, C] when transposed), A, c, grad_Z, grad_S.
    Tokens have an offset and scale (so the normalisation matters); logits are O(1-3)."""
    g = torch.Generator().manual_seed(seed)
    if transposed:
        x = (torch.randn(B, C, N, generator=g) * 2 + 0.5).transpose(1, 2)
    else:
        x = torch.randn(B, N, C, generator=g) * 2 + 0.5
    A = torch.randn(B, M, C, generator=g) * (1.5 / C ** 0.5)
    c = torch.randn(B, M, generator=g)
    gZ = torch.randn(B, M, C, generator=g)
    gS = torch.randn(B, M, N, generator=g)
    cast = lambda t: t.to(device=device, dtype=dtype)  # keeps x's strides
    return cast(x), cast(A), cast(c), cast(gZ), cast(gS)


def oracle(x, A, c, eps, gZ, gS):
    """float64 autograd of reference.proxy_attention_math: Z, S, lse, (dx, dA, dc).

    dc comes back as a Scaled value: dc = sum_n dS cancels (to exactly zero
    when only grad_Z is given), so its error is judged against sum_n |dS|,
    the size of what was summed."""
    xd, Ad, cd = (t.detach().double().requires_grad_() for t in (x, A, c))
    Z, S = ref.proxy_attention_math(xd, Ad, cd, eps)
    lse = torch.logsumexp(S, dim=-1)
    loss = Z.new_zeros(())
    if gZ is not None:
        loss = loss + (Z * gZ.double()).sum()
    if gS is not None:
        loss = loss + (S * gS.double()).sum()
    if not loss.requires_grad:
        return Z.detach(), S.detach(), lse.detach(), (None,) * 3
    dx, dA, dc, dS = torch.autograd.grad(loss, (xd, Ad, cd, S))
    return Z.detach(), S.detach(), lse.detach(), (dx, dA, Scaled(dc, dS.abs().sum(-1).max().item()))


class Scaled:
    """A reference value with the magnitude its error is measured against."""

    def __init__(self, value, scale):
        self.value, self.scale = value, scale


def rel_err(got, want):
    """Normwise: max |got - want| / max |want| (in float64); for a Scaled
    reference the denominator is at least its scale."""
    scale = 0.0
    if isinstance(want, Scaled):
        want, scale = want.value, want.scale
    got, want = got.detach().double(), want.detach().double().to(got.device)
    assert got.shape == want.shape, (got.shape, want.shape)
    denom = max(want.abs().max().item(), scale, 1e-30)
    return (got - want).abs().max().item() / denom


def assert_close(name, got, want, tol):
    err = rel_err(got, want)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def run_direct(x, A, c, eps, gZ, gS, config=None):
    Z, S, lse = tpa.proxy_attention_forward(x, A, c, eps, config=config)
    dx, dA, dc = tpa.proxy_attention_backward(gZ, gS, x, A, c, Z, lse, eps, config=config)
    return Z, S, lse, dx, dA, dc


def check_against_oracle(x, A, c, eps, gZ, gS, tol=F32_TOL, config=None):
    Z, S, lse, dx, dA, dc = run_direct(x, A, c, eps, gZ, gS, config)
    Zr, Sr, lser, (dxr, dAr, dcr) = oracle(x, A, c, eps, gZ, gS)
    assert Z.dtype == S.dtype == dx.dtype == dA.dtype == dc.dtype == x.dtype
    assert lse.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert dx.stride() == x.stride(), "dx should come back in x's layout"
    for name, got, want in (("Z", Z, Zr), ("S", S, Sr), ("lse", lse, lser),
                            ("dx", dx, dxr), ("dA", dA, dAr), ("dc", dc, dcr)):
        assert_close(name, got, want, tol)


# ---------------------------------------------------------------------------
# CPU (interpreter) tests
# ---------------------------------------------------------------------------

# (B, N, M, C, eps, transposed). Default interpreter blocks: 16 rows, 32 tokens,
# min(C, 32) channels, 256 tokens per program, so these cover: one/several row
# chunks, one/several channel chunks, one/several token ranges, partial tiles.
SHAPES = [
    (2, 77, 5, 3, None, True),
    (2, 77, 5, 3, 1e-5, False),
    (1, 1, 1, 3, 1e-5, True),        # N = 1
    (1, 1, 70, 96, None, False),     # N = 1, chunked rows and channels
    (2, 1000, 5, 33, 1e-5, True),    # 4 token ranges, 2 channel chunks
    (1, 300, 70, 96, 1e-5, True),    # 5 row chunks x 3 channel chunks
    (3, 130, 16, 16, None, True),    # everything in registers
    (1, 513, 1, 1, None, True),      # C = 1, M = 1
]


@interp
@pytest.mark.parametrize("B,N,M,C,eps,transposed", SHAPES)
def test_direct_matches_oracle(B, N, M, C, eps, transposed):
    x, A, c, gZ, gS = make_inputs(B, N, M, C, transposed=transposed)
    check_against_oracle(x, A, c, eps, gZ, gS)


# Explicit configs: the GPU-sized single-chunk fast paths and the chunked paths.
CONFIGS = [
    (2, 200, 40, 128, KC(64, 32, 128)),             # one row block, one channel block (registers)
    (2, 200, 70, 128, KC(32, 32, 128, 64)),         # rows chunked, channels in one block
    (1, 150, 20, 40, KC(16, 16, 16, 48)),           # 3 channel chunks, 2 row chunks, split 48
    (2, 100, 5, 20, KC(16, 64, 32)),                # automatic split_len
]


@interp
@pytest.mark.parametrize("eps", [None, 1e-5])
@pytest.mark.parametrize("B,N,M,C,cfg", CONFIGS)
def test_configs_match_oracle(B, N, M, C, cfg, eps):
    x, A, c, gZ, gS = make_inputs(B, N, M, C)
    check_against_oracle(x, A, c, eps, gZ, gS, config=cfg)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,C", [(8, 64), (32, 128), (70, 300)])
def test_gpu_table_configs_in_interpreter(M, C, dtype):
    """The configs the GPU table picks, run (in float32) by the interpreter."""
    x, A, c, gZ, gS = make_inputs(1, 150, M, C, seed=8)
    fwd_cfg = tpa.default_config(1, 150, M, C, dtype, backward=False, interpreted=False)
    bwd_cfg = tpa.default_config(1, 150, M, C, dtype, backward=True, interpreted=False)
    Z, S, lse = tpa.proxy_attention_forward(x, A, c, 1e-5, config=fwd_cfg)
    got = tpa.proxy_attention_backward(gZ, gS, x, A, c, Z, lse, 1e-5, config=bwd_cfg)
    Zr, Sr, lser, want = oracle(x, A, c, 1e-5, gZ, gS)
    for name, g, w in zip(("Z", "S", "lse", "dx", "dA", "dc"), (Z, S, lse, *got), (Zr, Sr, lser, *want)):
        assert_close(name, g, w, F32_TOL)


@interp
def test_large_rows_and_channels():
    """M = 256 rows of width C = 512: neither A nor Z fits one block."""
    x, A, c, gZ, gS = make_inputs(1, 40, 256, 512)
    check_against_oracle(x, A, c, 1e-5, gZ, gS, config=KC(64, 32, 128))


@interp
@pytest.mark.parametrize("which", ["both", "Z", "S"])
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_public_op_autograd(which, eps):
    """Through icl_kernels.proxy_attention: autograd passes None for the unused output."""
    x, A, c, gZ, gS = make_inputs(2, 90, 5, 33, seed=1)
    x, A, c = (t.detach().requires_grad_() for t in (x, A, c))
    Z, S = icl_kernels.proxy_attention(x, A, c, eps=eps, backend="triton")
    use_Z, use_S = which in ("both", "Z"), which in ("both", "S")
    loss = 0
    if use_Z:
        loss = loss + (Z * gZ).sum()
    if use_S:
        loss = loss + (S * gS).sum()
    dx, dA, dc = torch.autograd.grad(loss, (x, A, c))
    Zr, Sr, _, (dxr, dAr, dcr) = oracle(x, A, c, eps, gZ if use_Z else None, gS if use_S else None)
    assert_close("Z", Z, Zr, F32_TOL)
    assert_close("S", S, Sr, F32_TOL)
    assert dx.stride() == x.stride()
    for name, got, want in (("dx", dx, dxr), ("dA", dA, dAr), ("dc", dc, dcr)):
        assert_close(name, got, want, F32_TOL)


@interp
@pytest.mark.parametrize("which", ["Z", "S", "none"])
@pytest.mark.parametrize("B,N,M,C", [(1, 100, 70, 40), (2, 100, 5, 16)])  # chunked / in registers
def test_direct_partial_gradients(B, N, M, C, which):
    """The backward entry point with grad_Z or grad_S (or both) None."""
    x, A, c, gZ, gS = make_inputs(B, N, M, C, seed=2)
    gZ = gZ if which == "Z" else None
    gS = gS if which == "S" else None
    eps = 1e-5
    Z, S, lse = tpa.proxy_attention_forward(x, A, c, eps)
    dx, dA, dc = tpa.proxy_attention_backward(gZ, gS, x, A, c, Z, lse, eps)
    if which == "none":
        assert not dx.any() and not dA.any() and not dc.any()
        return
    _, _, _, (dxr, dAr, dcr) = oracle(x, A, c, eps, gZ, gS)
    for name, got, want in (("dx", dx, dxr), ("dA", dA, dAr), ("dc", dc, dcr)):
        assert_close(name, got, want, F32_TOL)


@interp
def test_strided_grad_S():
    """grad_S may arrive with any strides (e.g. from a permuted view of S)."""
    x, A, c, gZ, gS = make_inputs(2, 70, 5, 20, seed=3)
    gS_t = gS.transpose(1, 2).contiguous().transpose(1, 2)  # same values, N-major storage
    assert not gS_t.is_contiguous()
    Z, S, lse = tpa.proxy_attention_forward(x, A, c, None)
    got = tpa.proxy_attention_backward(gZ, gS_t, x, A, c, Z, lse, None)
    _, _, _, want = oracle(x, A, c, None, gZ, gS)
    for name, g, w in zip(("dx", "dA", "dc"), got, want):
        assert_close(name, g, w, F32_TOL)


@interp
def test_float64():
    x, A, c, gZ, gS = make_inputs(2, 100, 20, 33, dtype=torch.float64, seed=4)
    check_against_oracle(x, A, c, 1e-5, gZ, gS, tol=1e-12)


def plain_torch(x, A, c, eps, gZ, gS):
    """What a user would write with PyTorch ops in x's dtype: Z, S and (dx, dA, dc)."""
    x, A, c = (t.detach().requires_grad_() for t in (x, A, c))
    xh = F.layer_norm(x, (x.shape[-1],), eps=eps) if eps is not None else x
    S = torch.matmul(A, xh.transpose(1, 2)) + c.unsqueeze(-1)
    Z = torch.matmul(torch.softmax(S, dim=-1), xh)
    grads = torch.autograd.grad(((Z * gZ).sum() + (S * gS).sum()), (x, A, c))
    return Z, S, grads


def check_low_precision(x, A, c, eps, gZ, gS, config=None, floor=1e-3):
    """Kernel error <= 2 x (plain PyTorch error in the same dtype) + floor, both vs float64."""
    got_Z, got_S, _, *got_g = run_direct(x, A, c, eps, gZ, gS, config)
    base_Z, base_S, base_g = plain_torch(x, A, c, eps, gZ, gS)
    Zr, Sr, _, ref_g = oracle(x, A, c, eps, gZ, gS)
    names = ("Z", "S", "dx", "dA", "dc")
    for name, got, base, want in zip(names, (got_Z, got_S, *got_g), (base_Z, base_S, *base_g),
                                     (Zr, Sr, *ref_g)):
        e_k, e_t = rel_err(got, want), rel_err(base, want)
        assert e_k <= 2 * e_t + floor, f"{x.dtype} {name}: kernel {e_k:.2e} vs torch {e_t:.2e}"


@interp
def test_float16_interpreter():
    # bfloat16 arithmetic is not emulated correctly by the interpreter: GPU only.
    x, A, c, gZ, gS = make_inputs(2, 100, 20, 33, dtype=torch.float16, seed=5)
    check_low_precision(x, A, c, 1e-5, gZ, gS)


def large_logit_inputs(big, dtype, seed=11):
    """Logits around 1.8e4, from a large bias, large tokens or large queries (issue: float16
    backward at large logits), as in tests/test_proxy_attention.py."""
    g = torch.Generator().manual_seed(seed)
    x, A, c = torch.randn(2, 100, 64, generator=g), torch.randn(2, 8, 64, generator=g), torch.randn(2, 8, generator=g)
    if big == "c":
        c = c * 1.8e4
    elif big == "x":
        x = x * 600.0
    else:
        A = A * 600.0
    gZ, gS = torch.randn(2, 8, 64, generator=g), torch.randn(2, 8, 100, generator=g)
    return [t.to(dtype) for t in (x, A, c, gZ, gS)]


@interp
@pytest.mark.parametrize("big,eps", [("c", None), ("x", None), ("A", None), ("c", 1e-5), ("A", 1e-5)])
def test_float16_rule_at_large_logits_interpreter(big, eps):
    x, A, c, gZ, gS = large_logit_inputs(big, torch.float16)
    check_low_precision(x, A, c, eps, gZ, gS)


@interp
def test_backward_bitwise_deterministic():
    x, A, c, gZ, gS = make_inputs(2, 300, 20, 40, seed=6)
    for cfg in (None, KC(16, 32, 64, 64)):
        Z, S, lse = tpa.proxy_attention_forward(x, A, c, 1e-5, config=cfg)
        Z2, S2, lse2 = tpa.proxy_attention_forward(x, A, c, 1e-5, config=cfg)
        assert torch.equal(Z, Z2) and torch.equal(S, S2) and torch.equal(lse, lse2)
        first = tpa.proxy_attention_backward(gZ, gS, x, A, c, Z, lse, 1e-5, config=cfg)
        second = tpa.proxy_attention_backward(gZ, gS, x, A, c, Z, lse, 1e-5, config=cfg)
        for a, b in zip(first, second):
            assert torch.equal(a, b)


@interp
def test_empty_rows():
    x, A, c, gZ, gS = make_inputs(2, 10, 0, 8)
    Z, S, lse = tpa.proxy_attention_forward(x, A, c, 1e-5)
    assert Z.shape == (2, 0, 8) and S.shape == (2, 0, 10) and lse.shape == (2, 0)
    dx, dA, dc = tpa.proxy_attention_backward(gZ, gS, x, A, c, Z, lse, 1e-5)
    assert dx.shape == x.shape and not dx.any() and dA.shape == (2, 0, 8) and dc.shape == (2, 0)


@interp
@pytest.mark.parametrize("official_layout", [False, True])
def test_module_matches_torch_backend(official_layout):
    torch.manual_seed(7)
    mod = icl_kernels.ProxyAttention(32, num_heads=4, token_norm=True, official_layout=official_layout)
    q = torch.randn(2, 3, 32)
    x = torch.randn(2, 32, 60).transpose(1, 2)
    results = []
    for backend in ("torch", "triton"):
        mod.backend = backend
        qq, xx = q.clone().requires_grad_(), x.detach().clone().requires_grad_()
        out, attn = mod(qq, xx)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + attn.square().mean()
        grads = torch.autograd.grad(loss, (qq, xx, mod.fc_kv.weight, mod.norm_x.weight))
        results.append((out, attn, *grads))
    for name, got, want in zip(("out", "attn", "dq", "dx", "dWkv", "dgamma"), results[1], results[0]):
        assert_close(name, got, want, F32_TOL)


@interp
def test_torch_compile_module():
    """The module traces with fullgraph=True (custom op + fake kernels); aot_eager needs no C++ compiler."""
    torch.manual_seed(9)
    mod = icl_kernels.ProxyAttention(32, num_heads=4, token_norm=True, backend="triton")
    q = torch.randn(2, 3, 32)
    x = torch.randn(2, 32, 60).transpose(1, 2)
    results = []
    for fn, backend in ((torch.compile(mod, backend="aot_eager", fullgraph=True), "triton"), (mod, "torch")):
        mod.backend = backend
        qq, xx = q.clone().requires_grad_(), x.detach().clone().requires_grad_()
        out, attn = fn(qq, xx)
        loss = out.square().sum() + attn.square().mean()
        results.append((out, attn, *torch.autograd.grad(loss, (qq, xx, mod.fc_q.weight))))
    for name, got, want in zip(("out", "attn", "dq", "dx", "dWq"), results[0], results[1]):
        assert_close(name, got, want, F32_TOL)


@interp
def test_registered_as_available():
    assert hasattr(itr, "proxy_attention_forward") and hasattr(itr, "proxy_attention_backward")
    assert icl_kernels.available_backends(device="cpu")["triton"] is None


def test_unavailable_without_interpreter(monkeypatch):
    """CPU tensors and no interpreter: a clear error before any kernel runs."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = itr.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    x, A, c, _, _ = make_inputs(1, 8, 2, 4)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        icl_kernels.proxy_attention(x, A, c, backend="triton")
    assert icl_kernels.available_backends(device="cpu")["triton"] is not None


def test_kernels_reject_wrong_device(monkeypatch):
    """Kernels compiled for the GPU refuse CPU tensors with a message saying what to do."""
    monkeypatch.setattr(tpa, "INTERPRETED", False)
    x, A, c, _, _ = make_inputs(1, 8, 2, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tpa.proxy_attention_forward(x, A, c, None)


def test_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        KC(8, 32, 32)
    with pytest.raises(ValueError, match="power of two"):
        KC(16, 48, 32)
    with pytest.raises(TypeError, match="supports float32"):
        tpa._dtypes(torch.int32)


# Compiling every kernel variant for sm_90 (no GPU needed) is tests/test_triton_compile.py.


# ---------------------------------------------------------------------------
# GPU tests (compiled kernels on CUDA tensors)
# ---------------------------------------------------------------------------

GPU_SHAPES = [
    (2, 4096, 32, 128, 1e-5),
    (1, 16384, 8, 32, None),
    (2, 1000, 70, 96, 1e-5),
    (3, 77, 5, 3, None),
    (1, 4096, 256, 512, 1e-5),
    (2, 13824, 64, 64, 1e-5),
]


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,N,M,C,eps", GPU_SHAPES)
def test_gpu_dtypes(B, N, M, C, eps, dtype):
    x, A, c, gZ, gS = make_inputs(B, N, M, C, dtype=dtype, device="cuda")
    if dtype == torch.float32:
        check_against_oracle(x, A, c, eps, gZ, gS)
    check_low_precision(x, A, c, eps, gZ, gS)


@pytest.mark.gpu
@compiled
def test_gpu_float64():
    x, A, c, gZ, gS = make_inputs(2, 3000, 20, 96, dtype=torch.float64, device="cuda")
    check_against_oracle(x, A, c, 1e-5, gZ, gS, tol=1e-10)


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [True, False])
def test_gpu_million_tokens(dtype, transposed):
    x, A, c, gZ, gS = make_inputs(1, 1 << 20, 16, 64, dtype=dtype, device="cuda", transposed=transposed)
    if dtype == torch.float32:
        check_against_oracle(x, A, c, 1e-5, gZ, gS)
    else:
        check_low_precision(x, A, c, 1e-5, gZ, gS)


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("B,N,M,C", [(2, 200_000, 32, 128), (1, 50_000, 256, 512)])
def test_gpu_backward_bitwise_deterministic(B, N, M, C):
    x, A, c, gZ, gS = make_inputs(B, N, M, C, device="cuda")
    Z, S, lse = tpa.proxy_attention_forward(x, A, c, 1e-5)
    Z2, S2, lse2 = tpa.proxy_attention_forward(x, A, c, 1e-5)
    assert torch.equal(Z, Z2) and torch.equal(S, S2) and torch.equal(lse, lse2)
    first = tpa.proxy_attention_backward(gZ, gS, x, A, c, Z, lse, 1e-5)
    for _ in range(3):
        again = tpa.proxy_attention_backward(gZ, gS, x, A, c, Z, lse, 1e-5)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("which", ["Z", "S"])
def test_gpu_public_op_partial_gradients(which):
    x, A, c, gZ, gS = make_inputs(2, 5000, 20, 64, device="cuda")
    x, A, c = (t.detach().requires_grad_() for t in (x, A, c))
    Z, S = icl_kernels.proxy_attention(x, A, c, eps=1e-5, backend="triton")
    loss = (Z * gZ).sum() if which == "Z" else (S * gS).sum()
    got = torch.autograd.grad(loss, (x, A, c))
    _, _, _, want = oracle(x, A, c, 1e-5, gZ if which == "Z" else None, gS if which == "S" else None)
    for name, g, w in zip(("dx", "dA", "dc"), got, want):
        assert_close(name, g, w, F32_TOL)


@pytest.mark.gpu
@compiled
def test_gpu_torch_compile_module():
    torch.manual_seed(0)
    mod = icl_kernels.ProxyAttention(64, num_heads=4, token_norm=True, backend="triton").cuda()
    q = torch.randn(2, 4, 64, device="cuda")
    x = torch.randn(2, 64, 1024, device="cuda").transpose(1, 2)
    compiled = torch.compile(mod, fullgraph=True)
    results = []
    for fn, backend in ((mod, "torch"), (compiled, "triton")):
        mod.backend = backend
        qq, xx = q.clone().requires_grad_(), x.detach().clone().requires_grad_()
        out, attn = fn(qq, xx)
        loss = out.square().sum() + attn.square().mean()
        results.append((out, attn, *torch.autograd.grad(loss, (qq, xx, mod.fc_q.weight))))
    for name, got, want in zip(("out", "attn", "dq", "dx", "dWq"), results[1], results[0]):
        assert_close(name, got, want, 1e-3)
