"""The `cuda` backend on a GPU (skipped without one).

Accuracy rules:
- float32 / float64: relative error (max |kernel - ref| / max |ref|) against
  the float64 autograd reference `proxy_attention_math` <= 2e-4 (1e-10).
- float16 / bfloat16, the rule of the flash-attention tests: the kernel's error
  against the float64 reference is at most twice the error of the plain
  PyTorch computation in the same dtype (LayerNorm, baddbmm, softmax, bmm and
  their autograd), plus a floor of one unit roundoff of the dtype at the
  reference's scale: where both are a single final rounding (S, dc) their
  errors are equal on average, and for outputs of few elements (dc is [B, M])
  one unlucky rounding could otherwise exceed twice the other's.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import icl_kernels
from icl_kernels.reference import proxy_attention_math

pytestmark = pytest.mark.gpu

FWD = torch.ops.icl_kernels._proxy_attention_forward
BWD = torch.ops.icl_kernels._proxy_attention_backward


@pytest.fixture(autouse=True)
def cuda_backend():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = icl_kernels.available_backends(device="cuda")["cuda"]
    if reason is not None:
        # A GPU machine may well hold a CPU-only build (no toolkit, a toolkit of
        # another CUDA major version, ICL_BUILD_CUDA=0): skip and say why, unless
        # ICL_EXPECT_CUDA=1 says the CUDA kernels must be there (then it is a failure).
        why = reason
        try:
            from icl_kernels import _build_info

            why += f" (setup.py: {getattr(_build_info, 'CUDA_REASON', '?')})"
        except ImportError:
            pass
        if os.environ.get("ICL_EXPECT_CUDA") == "1":
            pytest.fail(f"ICL_EXPECT_CUDA=1 but the cuda backend cannot run on this GPU machine: {why}")
        pytest.skip(f"the cuda backend cannot run here (set ICL_EXPECT_CUDA=1 to fail instead): {why}")


def make_x(B, N, C, dtype, layout="rows", device="cuda"):
    # Tokens with an offset and a scale of their own, as LayerNorm inputs have.
    values = torch.randn(B, N, C, device=device) * (1 + torch.rand(B, N, 1, device=device))
    values = values + torch.randn(B, N, 1, device=device)
    if layout == "rows":
        x = torch.empty(B, N, C, device=device, dtype=dtype)
    elif layout == "tokens":  # a [B, C, N] feature map viewed as tokens, no copy
        x = torch.empty(B, C, N, device=device, dtype=dtype).transpose(1, 2)
    elif layout == "strided":  # neither axis contiguous
        x = torch.empty(B, N, 2 * C, device=device, dtype=dtype)[:, :, ::2]
    else:
        raise ValueError(layout)
    return x.copy_(values)


def make_inputs(B, N, M, C, dtype, layout="rows", seed=0):
    torch.manual_seed(seed)
    x = make_x(B, N, C, dtype, layout)
    A = (torch.randn(B, M, C, device="cuda") / C**0.5 * 2).to(dtype)
    c = torch.randn(B, M, device="cuda").to(dtype)
    gZ = torch.randn(B, M, C, device="cuda").to(dtype)
    gS = torch.randn(B, M, N, device="cuda").to(dtype)
    return x, A, c, gZ, gS


def run_op(x, A, c, eps, gZ, gS, backend="cuda"):
    """(Z, S, dx, dA, dc) of the user-facing op and its autograd."""
    xk, Ak, ck = (t.detach().requires_grad_(True) for t in (x, A, c))
    Z, S = icl_kernels.proxy_attention(xk, Ak, ck, eps=eps, backend=backend)
    torch.autograd.backward([Z, S], [gZ, gS])
    return Z.detach(), S.detach(), xk.grad, Ak.grad, ck.grad


def run_reference(x, A, c, eps, gZ, gS):
    """float64 autograd of the composite form."""
    xd, Ad, cd = (t.detach().double().requires_grad_(True) for t in (x, A, c))
    Z, S = proxy_attention_math(xd, Ad, cd, eps)
    torch.autograd.backward([Z, S], [gZ.double(), gS.double()])
    return Z.detach(), S.detach(), xd.grad, Ad.grad, cd.grad


def run_plain(x, A, c, eps, gZ, gS):
    """The textbook computation in x's dtype, every op rounding to it."""
    xk, Ak, ck = (t.detach().requires_grad_(True) for t in (x, A, c))
    xhat = F.layer_norm(xk, (x.shape[-1],), eps=eps) if eps is not None else xk
    S = torch.baddbmm(ck.unsqueeze(-1), Ak, xhat.transpose(1, 2))
    Z = torch.bmm(torch.softmax(S, dim=-1), xhat)
    torch.autograd.backward([Z, S], [gZ, gS])
    return Z.detach(), S.detach(), xk.grad, Ak.grad, ck.grad


NAMES = ("Z", "S", "dx", "dA", "dc")


def max_err(a, ref):
    return (a.double() - ref).abs().max().item()


def check_against_reference(got, ref, rtol):
    for name, g, r in zip(NAMES, got, ref):
        assert g.shape == r.shape, name
        assert torch.isfinite(g).all(), name
        scale = r.abs().max().item()
        err = max_err(g, r)
        assert err <= rtol * max(scale, 1e-30), f"{name}: error {err:.3g} vs scale {scale:.3g}"


def check_flash_rule(got, plain, ref):
    for name, g, p, r in zip(NAMES, got, plain, ref):
        assert torch.isfinite(g).all(), name
        floor = torch.finfo(g.dtype).eps / 2 * r.abs().max().item()
        err_kernel, err_plain = max_err(g, r), max_err(p, r)
        assert err_kernel <= 2 * err_plain + floor, (
            f"{name}: kernel error {err_kernel:.3g} > 2 x plain {g.dtype} error {err_plain:.3g} + {floor:.2g}"
        )


SHAPES = [  # (B, N, M, C)
    (2, 1024, 32, 128),  # a published 2D level
    (3, 4099, 16, 64),
    (2, 777, 13, 97),  # odd everything
    (1, 333, 40, 200),  # C <= 256 kernel, several row chunks
    (2, 515, 21, 512),  # widest token
    (4, 216, 64, 256),  # a published 3D level
    (1, 1, 1, 1),
    (5, 31, 3, 7),
]


@pytest.mark.parametrize("eps", [None, 1e-5])
@pytest.mark.parametrize("B,N,M,C", SHAPES)
def test_float32_matches_reference(B, N, M, C, eps):
    x, A, c, gZ, gS = make_inputs(B, N, M, C, torch.float32)
    check_against_reference(run_op(x, A, c, eps, gZ, gS), run_reference(x, A, c, eps, gZ, gS), 2e-4)


@pytest.mark.parametrize("layout", ["tokens", "strided"])
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_non_contiguous_x(layout, eps):
    x, A, c, gZ, gS = make_inputs(2, 1500, 24, 96, torch.float32, layout)
    assert not x.is_contiguous()
    got = run_op(x, A, c, eps, gZ, gS)
    check_against_reference(got, run_reference(x, A, c, eps, gZ, gS), 2e-4)
    Z, S, lse = FWD(x, A, c, eps)
    dx, _, _ = BWD(gZ, gS, x, A, c, Z, lse, eps)
    if layout == "tokens":
        assert dx.stride() == x.stride()  # dx in x's layout, written without a copy


@pytest.mark.parametrize("eps", [None, 1e-5])
@pytest.mark.parametrize("B,N,M,C", [(2, 1000, 24, 96), (1, 3001, 9, 300), (2, 64, 70, 33)])
def test_float64_matches_reference(B, N, M, C, eps):
    x, A, c, gZ, gS = make_inputs(B, N, M, C, torch.float64, "tokens")
    check_against_reference(run_op(x, A, c, eps, gZ, gS), run_reference(x, A, c, eps, gZ, gS), 1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("eps", [None, 1e-5])
@pytest.mark.parametrize("B,N,M,C,layout", [
    (2, 1024, 32, 128, "rows"),
    (2, 4096, 16, 64, "tokens"),
    (3, 777, 13, 97, "rows"),
    (1, 1500, 40, 300, "tokens"),
])
def test_half_precision_flash_rule(B, N, M, C, layout, eps, dtype):
    x, A, c, gZ, gS = make_inputs(B, N, M, C, dtype, layout)
    ref = run_reference(x, A, c, eps, gZ, gS)
    check_flash_rule(run_op(x, A, c, eps, gZ, gS), run_plain(x, A, c, eps, gZ, gS), ref)


@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("big,eps", [("c", None), ("x", None), ("A", None), ("c", 1e-5), ("A", 1e-5)])
def test_half_precision_rule_at_large_logits(big, eps, dtype, backend):
    """Logits around 1.8e4 (a large bias, large tokens or large queries): the rule holds for
    every GPU backend, forward and backward (the CPU cases: tests/test_proxy_attention.py)."""
    why = icl_kernels.available_backends(device="cuda").get(backend)
    if why is not None:
        pytest.skip(f"{backend}: {why}")
    torch.manual_seed(11)
    x, A, c = torch.randn(2, 100, 64, device="cuda"), torch.randn(2, 8, 64, device="cuda"), torch.randn(2, 8, device="cuda")
    if big == "c":
        c = c * 1.8e4
    elif big == "x":
        x = x * 600.0
    else:
        A = A * 600.0
    gZ, gS = torch.randn(2, 8, 64, device="cuda"), torch.randn(2, 8, 100, device="cuda")
    x, A, c, gZ, gS = (t.to(dtype) for t in (x, A, c, gZ, gS))
    ref = run_reference(x, A, c, eps, gZ, gS)
    assert ref[1].abs().max() > 1e4
    check_flash_rule(run_op(x, A, c, eps, gZ, gS, backend=backend), run_plain(x, A, c, eps, gZ, gS), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_million_tokens(dtype):
    B, N, M, C, eps = 1, 1 << 20, 8, 64, 1e-5
    x, A, c, gZ, gS = make_inputs(B, N, M, C, dtype, "tokens")
    got = run_op(x, A, c, eps, gZ, gS)
    ref = run_reference(x, A, c, eps, gZ, gS)
    if dtype == torch.float32:
        check_against_reference(got, ref, 2e-4)
    else:
        check_flash_rule(got, run_plain(x, A, c, eps, gZ, gS), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,N,M,C", [(2, 100_000, 40, 128), (1, 20_000, 100, 300)])
def test_bitwise_deterministic(B, N, M, C, dtype):
    x, A, c, gZ, gS = make_inputs(B, N, M, C, dtype)
    first = FWD(x, A, c, 1e-5)
    first_bwd = BWD(gZ, gS, x, A, c, first[0], first[2], 1e-5)
    for _ in range(3):
        again = FWD(x, A, c, 1e-5)
        again_bwd = BWD(gZ, gS, x, A, c, first[0], first[2], 1e-5)
        for a, b in zip(first + first_bwd, again + again_bwd):
            assert torch.equal(a, b)


@pytest.mark.parametrize("which", ["Z", "S", "none"])
def test_absent_gradients(which):
    x, A, c, gZ, gS = make_inputs(2, 500, 12, 80, torch.float32)
    Z, S, lse = FWD(x, A, c, 1e-5)
    gz = gZ if which == "Z" else None
    gs = gS if which == "S" else None
    dx, dA, dc = BWD(gz, gs, x, A, c, Z, lse, 1e-5)
    ref = icl_kernels.reference.proxy_attention_backward(
        None if gz is None else gz.double(), None if gs is None else gs.double(),
        x.double(), A.double(), c.double(), Z.double(), lse.double(), 1e-5,
    )
    for got, want in zip((dx, dA, dc), ref):
        # With grad_Z alone dc is exactly zero (sum_n P (dP - D) = 0): judge it on a unit scale.
        assert (got.double() - want).abs().max() <= 2e-4 * max(want.abs().max().item(), 1.0)


@pytest.mark.parametrize("eps", [None, 1e-5])
def test_opcheck_raw_ops(eps):
    x, A, c, gZ, gS = make_inputs(2, 300, 10, 48, torch.float32, "tokens")
    torch.library.opcheck(FWD.default, (x, A, c, eps))
    Z, S, lse = FWD(x, A, c, eps)
    torch.library.opcheck(BWD.default, (gZ, gS, x, A, c, Z, lse, eps))
    torch.library.opcheck(BWD.default, (None, gS, x, A, c, Z, lse, eps))
    torch.library.opcheck(BWD.default, (gZ, None, x, A, c, Z, lse, eps))


def test_runs_on_the_current_stream():
    x, A, c, gZ, gS = make_inputs(4, 50_000, 32, 128, torch.float32)
    Z, S, lse = FWD(x, A, c, 1e-5)
    expected = (Z, S, lse) + BWD(gZ, gS, x, A, c, Z, lse, 1e-5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        Z, S, lse = FWD(x, A, c, 1e-5)
        grads = BWD(gZ, gS, x, A, c, Z, lse, 1e-5)
        got = (Z, S, lse) + grads
    torch.cuda.current_stream().wait_stream(side)
    for t in got:
        t.record_stream(torch.cuda.current_stream())
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_tensors_device():
    x, A, c, gZ, gS = make_inputs(2, 3000, 20, 96, torch.float32)
    expected = FWD(x, A, c, 1e-5)
    moved = [t.to("cuda:1") for t in (x, A, c)]
    with torch.cuda.device(0):  # the current device is not the tensors'
        got = FWD(*moved, 1e-5)
        grads = BWD(gZ.to("cuda:1"), gS.to("cuda:1"), *moved, got[0], got[2], 1e-5)
    assert all(t.device == torch.device("cuda:1") for t in got + grads)
    for a, b in zip(expected, got):
        assert torch.equal(a, b.to("cuda:0"))


def test_errors_are_python_exceptions():
    x = torch.randn(1, 10, 1024, device="cuda")
    with pytest.raises(ValueError, match="C <= 512"):
        FWD(x, torch.randn(1, 2, 1024, device="cuda"), torch.randn(1, 2, device="cuda"), None)
    with pytest.raises(ValueError):
        FWD(x, torch.randn(1, 2, 1024), torch.randn(1, 2, device="cuda"), None)  # A on the CPU


@pytest.mark.large
def test_beyond_two_to_the_31_elements():
    """A bf16 x of more than 2^31 elements: offsets need 64 bits.  The reference
    is computed chunk by chunk in float32 on the GPU."""
    C, M, eps = 256, 4, 1e-5
    N = (1 << 31) // C + 4096
    torch.manual_seed(0)
    x = torch.empty(1, N, C, device="cuda", dtype=torch.bfloat16)
    chunk = 1 << 20
    for n0 in range(0, N, chunk):
        x[:, n0 : n0 + chunk].normal_()
    assert x.numel() > 2**31
    A = (torch.randn(1, M, C, device="cuda") / C**0.5 * 2).to(torch.bfloat16)
    c = torch.randn(1, M, device="cuda").to(torch.bfloat16)
    gZ = torch.randn(1, M, C, device="cuda").to(torch.bfloat16)
    gS = torch.randn(1, M, N, device="cuda").to(torch.bfloat16)
    Z, S, lse = FWD(x, A, c, eps)
    dx, dA, dc = BWD(gZ, gS, x, A, c, Z, lse, eps)

    Af, cf, gZf = A[0].float(), c[0].float(), gZ[0].float()

    def xhat_of(n0):
        return F.layer_norm(x[0, n0 : n0 + chunk].float(), (C,), eps=eps)

    S_ref = torch.empty(M, N, device="cuda")
    for n0 in range(0, N, chunk):
        S_ref[:, n0 : n0 + chunk] = Af @ xhat_of(n0).T + cf[:, None]
    lse_ref = torch.logsumexp(S_ref, dim=-1)
    Z_ref = torch.zeros(M, C, device="cuda")
    for n0 in range(0, N, chunk):
        Z_ref += torch.exp(S_ref[:, n0 : n0 + chunk] - lse_ref[:, None]) @ xhat_of(n0)

    def rel(a, b):
        return ((a.float() - b).abs().max() / b.abs().max()).item()

    assert rel(S[0], S_ref) < 1e-2
    assert rel(lse[0], lse_ref) < 1e-4
    assert rel(Z[0], Z_ref) < 1e-2

    D = (gZf * Z[0].float()).sum(-1)
    dA_ref = torch.zeros(M, C, device="cuda")
    dc_ref = torch.zeros(M, device="cuda")
    worst_dx = 0.0
    for n0 in range(0, N, chunk):
        xh = xhat_of(n0)
        P = torch.exp(S_ref[:, n0 : n0 + chunk] - lse_ref[:, None])
        dS = gS[0, :, n0 : n0 + chunk].float() + P * (gZf @ xh.T - D[:, None])
        dA_ref += dS @ xh
        dc_ref += dS.sum(-1)
        dxh = dS.T @ Af + P.T @ gZf
        xc = x[0, n0 : n0 + chunk].float()
        rstd = torch.rsqrt(xc.var(-1, unbiased=False, keepdim=True) + eps)
        dx_ref = rstd * (dxh - dxh.mean(-1, keepdim=True) - xh * (dxh * xh).mean(-1, keepdim=True))
        worst_dx = max(worst_dx, rel(dx[0, n0 : n0 + chunk], dx_ref))
    assert worst_dx < 2e-2  # includes the tokens past element 2^31
    assert rel(dA[0], dA_ref) < 1e-2
    assert rel(dc[0], dc_ref) < 1e-2
