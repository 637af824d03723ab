"""The CUDA kernels (csrc/cuda/), run on the CPU through an emulation of the
CUDA execution model (tests/cuda_emu/cuda_emu.h): same kernel source, same
host code (partition, launches), CPU tensors.

The emulation runs every thread of a block as a fiber with real barriers and
warp shuffles, in a random order, with shared memory poisoned by NaNs: it
checks indexing, tiling, synchronisation and the reduction order of the
kernels on machines without a GPU. It says nothing about speed, and the GPU's
fast-math functions are replaced by the host's: the GPU tests
(test_gpu_proxy_attention.py) remain the final word.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from icl_kernels.reference import proxy_attention_backward, proxy_attention_forward

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def emu():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler to build the emulated kernels")
    from torch.utils.cpp_extension import load

    return load(
        name="icl_cuda_emu",
        sources=[os.path.join(HERE, "cuda_emu", "emu_module.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc"), os.path.join(HERE, "cuda_emu")],
        extra_cflags=["-O2", "-Wno-unknown-pragmas"],
        verbose=False,
    )


def make_x(B, N, C, dtype, layout):
    """x [B, N, C] in a given memory layout.  Except for "tokens", the view sits
    inside a larger buffer filled with NaN: a read out of bounds poisons the result."""
    nan = float("nan")
    if layout == "rows":  # channels contiguous
        x = torch.full((B, N + 2, C + 2), nan, dtype=dtype)[:, 1 : N + 1, 1 : C + 1]
    elif layout == "tokens":  # a dense [B, C, N] map viewed as tokens (dx gets the same layout)
        x = torch.empty(B, C, N, dtype=dtype).transpose(1, 2)
    elif layout == "tokens_padded":
        x = torch.full((B, C + 2, N + 2), nan, dtype=dtype)[:, 1 : C + 1, 1 : N + 1].transpose(1, 2)
    elif layout == "strided":  # neither axis contiguous
        x = torch.full((B, N + 2, 2 * C + 2), nan, dtype=dtype)[:, 1 : N + 1, 1 : 2 * C + 1 : 2]
    else:
        raise ValueError(layout)
    x.copy_(torch.randn(B, N, C, dtype=torch.float64).to(dtype))
    return x


def rel_err(a, b):
    b = b.double()
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}

# (B, N, M, C, eps, layout, dtype, resident): resident is the number of blocks
# the emulated device claims to run at once (more -> more token splits).
CASES = [
    (1, 40, 5, 20, None, "rows", torch.float32, 8),  # one split, partial tile
    (2, 100, 12, 48, 1e-5, "rows", torch.float32, 8),  # rows split unevenly over warps
    (2, 300, 40, 100, 1e-5, "rows", torch.float32, 64),  # 5 splits, 2 row chunks (C <= 128)
    (1, 130, 20, 200, None, "tokens", torch.float32, 8),  # C <= 256 kernel, 2 row chunks
    (2, 77, 20, 300, 1e-3, "tokens_padded", torch.float32, 8),  # C <= 512 kernel, 3 row chunks
    (1, 50, 3, 512, 1e-5, "rows", torch.float32, 8),  # widest token
    (1, 45, 6, 40, 1e-5, "strided", torch.float32, 8),  # general strides
    (2, 70, 9, 33, 1e-5, "tokens", torch.float64, 8),  # float64: 16-token tiles
    (2, 70, 9, 33, None, "rows", torch.float64, 64),
    (1, 90, 7, 64, 1e-5, "rows", torch.bfloat16, 8),
    (1, 90, 7, 64, None, "tokens", torch.float16, 8),
    (2, 95, 17, 160, 1e-5, "tokens_padded", torch.float32, 8),
    (1, 1, 1, 1, None, "rows", torch.float32, 8),  # smallest shape
    (1, 1, 1, 1, 1e-5, "rows", torch.float32, 8),
]


@pytest.mark.parametrize("B,N,M,C,eps,layout,dtype,resident", CASES)
def test_matches_reference(emu, B, N, M, C, eps, layout, dtype, resident):
    torch.manual_seed(B * 1000 + N + M + C)
    x = make_x(B, N, C, dtype, layout)
    A = (0.3 * torch.randn(B, M, C, dtype=torch.float64)).to(dtype)
    c = torch.randn(B, M, dtype=torch.float64).to(dtype)
    Z, S, lse = emu.forward(x, A, c, eps, resident)
    xd, Ad, cd = x.double(), A.double(), c.double()
    Zr, Sr, lser = proxy_attention_forward(xd, Ad, cd, eps)
    tol = TOL[dtype]
    assert Z.dtype == dtype and S.dtype == dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(S, Sr) <= tol
    assert rel_err(Z, Zr) <= tol
    assert rel_err(lse, lser) <= tol

    grad_Z = torch.randn(B, M, C, dtype=torch.float64).to(dtype)
    grad_S = torch.randn(B, M, N, dtype=torch.float64).to(dtype)
    dx, dA, dc = emu.backward(grad_Z, grad_S, x, A, c, Z, lse, eps, resident)
    dxr, dAr, dcr = proxy_attention_backward(grad_Z.double(), grad_S.double(), xd, Ad, cd, Z.double(), lse.double(), eps)
    assert dx.shape == x.shape and dx.dtype == dtype
    if layout == "tokens":
        assert dx.stride() == x.stride()  # dx keeps a dense x's layout, written token-major
    assert rel_err(dx, dxr) <= tol
    assert rel_err(dA, dAr) <= tol
    assert rel_err(dc, dcr) <= tol


@pytest.mark.parametrize("which", ["Z", "S"])
def test_one_gradient_absent(emu, which):
    torch.manual_seed(3)
    B, N, M, C, eps = 2, 150, 35, 72, 1e-5
    x, A, c = torch.randn(B, N, C), 0.3 * torch.randn(B, M, C), torch.randn(B, M)
    Z, S, lse = emu.forward(x, A, c, eps, 16)
    grad_Z = torch.randn(B, M, C) if which == "Z" else None
    grad_S = torch.randn(B, M, N).transpose(1, 2).contiguous().transpose(1, 2) if which == "S" else None
    dx, dA, dc = emu.backward(grad_Z, grad_S, x, A, c, Z, lse, eps, 16)
    ref = proxy_attention_backward(
        None if grad_Z is None else grad_Z.double(), None if grad_S is None else grad_S.double(),
        x.double(), A.double(), c.double(), Z.double(), lse.double(), eps,
    )
    for got, want in zip((dx, dA, dc), ref):
        # With grad_Z alone dc is exactly zero (sum_n P (dP - D) = 0): judge it on a unit scale.
        assert (got.double() - want).abs().max() <= 2e-5 * max(want.abs().max().item(), 1.0)


def test_bitwise_reproducible_across_schedules(emu):
    """Threads and blocks run in a different random order under each seed: a race
    or an order-dependent reduction would change the bits."""
    torch.manual_seed(4)
    B, N, M, C, eps = 2, 200, 40, 100, 1e-5
    x, A, c = torch.randn(B, N, C), 0.3 * torch.randn(B, M, C), torch.randn(B, M)
    gZ, gS = torch.randn(B, M, C), torch.randn(B, M, N)
    outs = []
    for seed in (0, 1):
        Z, S, lse = emu.forward(x, A, c, eps, 32, seed)
        outs.append((Z, S, lse) + tuple(emu.backward(gZ, gS, x, A, c, Z, lse, eps, 32, seed)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_empty_rows_and_batches(emu):
    x = torch.randn(2, 10, 8)
    Z, S, lse = emu.forward(x, torch.randn(2, 0, 8), torch.randn(2, 0), None)
    assert Z.shape == (2, 0, 8) and S.shape == (2, 0, 10) and lse.shape == (2, 0)
    dx, dA, dc = emu.backward(None, None, x, torch.randn(2, 0, 8), torch.randn(2, 0), Z, lse, None)
    assert torch.equal(dx, torch.zeros_like(x)) and dA.shape == (2, 0, 8) and dc.shape == (2, 0)
    Z, S, lse = emu.forward(torch.randn(0, 10, 8), torch.randn(0, 3, 8), torch.randn(0, 3), 1e-5)
    assert Z.shape == (0, 3, 8) and S.shape == (0, 3, 10)


def test_too_wide_tokens_rejected(emu):
    x = torch.randn(1, 4, 513)
    with pytest.raises(ValueError, match="C <= 512"):
        emu.forward(x, torch.randn(1, 2, 513), torch.randn(1, 2), None)


@pytest.mark.parametrize("N", [1, 31, 64, 65, 1000, 1 << 20, (1 << 20) + 17])
@pytest.mark.parametrize("units,target,partial", [(1, 8, 100), (4, 264, 10**6), (64, 264, 8 * 256 * 512), (1, 10**6, 1)])
def test_partition_covers_tokens(emu, N, units, target, partial):
    splits, split_len = emu.partition(N, units, target, partial, 32)
    assert split_len % 32 == 0 and splits >= 1
    assert (splits - 1) * split_len < N <= splits * split_len  # every split holds tokens
    assert splits == 1 or split_len >= 64
    assert splits <= max(1, -(-target // units))
    assert splits == 1 or splits * partial <= (1 << 23)
