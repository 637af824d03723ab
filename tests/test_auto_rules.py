"""`auto` on CPU: the measured rules (icl_kernels/auto.py) pick what the
committed benchmark says is fastest, and the unfused path `auto` may take
computes the same thing as the fused one."""
from __future__ import annotations

import os

import pytest
import torch

import icl_kernels
from icl_kernels import auto
from icl_kernels.reference import proxy_attention_math

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benches", "results", "cpu")


@pytest.mark.parametrize("N,C,H,K,unfused", [
    (216, 256, 16, 16, True), (1728, 128, 8, 16, True), (13824, 64, 4, 16, False),   # 3D levels
    (1024, 128, 8, 4, False), (4096, 64, 4, 4, False), (16384, 32, 2, 4, False),     # 2D levels
    (36, 128, 8, 3, True), (576, 32, 2, 3, False),                                   # the demo's 48x48 levels
])
def test_rule_on_the_published_levels(N, C, H, K, unfused):
    assert auto.cpu_prefers_unfused(N, C, H, H * K) is unfused


def test_rule_boundaries():
    # 2D-like ratio (~4.1): unfused only while N * r <= 800
    assert auto.cpu_prefers_unfused(190, 128, 8, 32) and not auto.cpu_prefers_unfused(200, 128, 8, 32)
    # near-even flops (r = 1.0625): unfused up to N * r = 2000
    assert auto.cpu_prefers_unfused(1880, 256, 16, 256) and not auto.cpu_prefers_unfused(1890, 256, 16, 256)


def test_flop_ratio():
    # C / M + 1 / H: the 3D coarse level costs about the same both ways, the 2D one 4x more unfused
    assert auto.unfused_flop_ratio(256, 16, 256) == pytest.approx(1.0625)
    assert auto.unfused_flop_ratio(128, 8, 32) == pytest.approx(4.125)


def _pair(C, H, monkeypatch, backend, official_layout=True):
    torch.manual_seed(0)
    m = icl_kernels.ProxyAttention(C, H, token_norm=True, official_layout=official_layout, backend=backend).double()
    with torch.no_grad():
        m.norm_x.weight.uniform_(0.5, 1.5)
        m.norm_x.bias.uniform_(-0.2, 0.2)
    calls = []
    orig = type(m).forward_explicit

    def counting(self, q, x):
        calls.append(x.shape)
        return orig(self, q, x)

    monkeypatch.setattr(type(m), "forward_explicit", counting)
    return m, calls


@pytest.mark.parametrize("official_layout", [True, False])
@pytest.mark.parametrize("shape", [(2, 30, 16, 4, 8), (1, 7, 24, 3, 8)])  # B, N, C, H, K with M >= C
def test_auto_unfused_path_matches_the_fused_op(shape, official_layout, monkeypatch):
    B, N, C, H, K = shape
    assert auto.cpu_prefers_unfused(N, C, H, H * K)
    m, calls = _pair(C, H, monkeypatch, None, official_layout)
    monkeypatch.delenv("ICL_KERNELS_BACKEND", raising=False)
    q = torch.randn(B, K, C, dtype=torch.float64, requires_grad=True)
    x = torch.randn(B, C, N, dtype=torch.float64).transpose(1, 2).requires_grad_()  # strided tokens
    out, attn = m(q, x)
    assert len(calls) == 1  # auto took the unfused formulation
    g_out, g_attn = torch.randn_like(out), torch.randn_like(attn)
    grads = torch.autograd.grad((out, attn), (q, x) + tuple(m.parameters()), (g_out, g_attn))
    m.backend = "torch"  # the fused op, named: no unfused path
    out2, attn2 = m(q, x)
    assert len(calls) == 1
    grads2 = torch.autograd.grad((out2, attn2), (q, x) + tuple(m.parameters()), (g_out, g_attn))
    torch.testing.assert_close(out, out2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attn, attn2, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_named_backend_or_environment_never_takes_the_unfused_path(monkeypatch):
    m, calls = _pair(16, 4, monkeypatch, None)
    q, x = torch.randn(2, 8, 16, dtype=torch.float64), torch.randn(2, 30, 16, dtype=torch.float64)
    monkeypatch.setenv("ICL_KERNELS_BACKEND", "cpu")
    m(q, x)
    monkeypatch.setenv("ICL_KERNELS_BACKEND", "auto")
    m(q, x)
    assert len(calls) == 1
    monkeypatch.delenv("ICL_KERNELS_BACKEND")
    m.backend = "torch"
    m(q, x)
    assert len(calls) == 1


def test_op_auto_on_cpu_runs_the_cpu_kernel_for_float32_and_64(monkeypatch):
    import importlib

    op = importlib.import_module("icl_kernels.ops.proxy_attention")
    if icl_kernels.available_backends(device="cpu")["cpu"] is not None:
        pytest.skip("the extension's cpu kernels are not built here")
    seen = []
    real = op.backends.resolve

    def spy(name, requested, device, order=None, dtype=None):
        be = real(name, requested, device, order, dtype=dtype)
        seen.append(be.name)
        return be

    monkeypatch.setattr(op.backends, "resolve", spy)
    monkeypatch.delenv("ICL_KERNELS_BACKEND", raising=False)
    for dtype, want in ((torch.float64, "cpu"), (torch.float32, "cpu"), (torch.bfloat16, "torch")):
        seen.clear()
        x = torch.randn(1, 50, 16, dtype=dtype, requires_grad=True)
        A = torch.randn(1, 256, 16, dtype=dtype, requires_grad=True)   # many rows over few tokens: still cpu
        c = torch.randn(1, 256, dtype=dtype, requires_grad=True)
        Z, S = icl_kernels.proxy_attention(x, A, c, eps=1e-5)
        (Z.float().sum() + S.float().square().sum()).backward()
        assert set(seen) == {want}, dtype
        if dtype == torch.float64:
            Zr, Sr = proxy_attention_math(x.detach(), A.detach(), c.detach(), eps=1e-5)
            torch.testing.assert_close(Z, Zr)
            torch.testing.assert_close(S, Sr)


def _committed(name):
    path = os.path.join(RESULTS, name)
    if not os.path.isfile(path):
        pytest.skip(f"{path} is not in this checkout")
    from benches.proxy_attention import median_times, shape_fields

    return median_times([path]), shape_fields


def test_rule_agrees_with_the_committed_crossover_sweep():
    """The rule's pick (unfused or the cpu kernel) was never more than 20% slower
    than the faster of the two on the committed sweep (medians of three runs):
    changing the rule without re-measuring fails here."""
    times, fields = _committed("proxy_attention_crossover.csv")
    shapes = sorted({s for s, p in times if p == "icl-cpu"})
    assert len(shapes) >= 40
    worst = []
    for s in shapes:
        f = fields(s)
        unfused = auto.cpu_prefers_unfused(f["N"], f["C"], f["H"], f["H"] * f["K"])
        pick = times[(s, "icl-explicit" if unfused else "icl-cpu")]
        worst.append((pick / min(times[(s, "icl-explicit")], times[(s, "icl-cpu")]), s))
    assert max(worst)[0] <= 1.2, max(worst)
    # and the rule is not trivial: both formulations win somewhere
    picks = {auto.cpu_prefers_unfused(fields(s)["N"], fields(s)["C"], fields(s)["H"], fields(s)["H"] * fields(s)["K"])
             for s in shapes}
    assert picks == {True, False}


# Timing noise of the committed CPU run: the same code timed as two providers in
# interleaved rounds differed by up to 22% (the `cpu` kernel at N=65536, a memory-bound
# shape on a host whose copy bandwidth varied 11-19 GB/s over the day).
NOISE_SAME_CODE = 1.25
# ... and the identical unfused and published eager computations by up to 8%.
NOISE = 1.10


def test_auto_picks_within_10_percent_of_the_fastest_on_the_committed_headline_benchmark():
    """On every shape of `python -m benches.proxy_attention` (committed CPU run with
    --interleave 5: the five providers that matter here timed in turn, median round):
    what `auto` picks (the `cpu` kernel or the unfused formulation, each also timed as
    its own provider) is within 10% of the fastest of `cpu`, `torch` and unfused, and
    not slower than the published eager formulation beyond the noise of identical
    computations; `auto`'s own time agrees with its pick's within the same-code noise."""
    times, fields = _committed("proxy_attention_auto.csv")
    shapes = sorted({s for s, p in times if p == "icl-auto"})
    assert len(shapes) >= 10, "the committed run has no icl-auto rows"
    for s in shapes:
        f = fields(s)
        if "N" in f:
            unfused = auto.cpu_prefers_unfused(f["N"], f["C"], f["H"], f["H"] * f["K"])
        else:  # several levels in one step: each level decides (all fused at the published 2D levels)
            unfused = False
        pick = times[(s, "icl-explicit" if unfused else "icl-cpu")]
        fastest = min(times[(s, p)] for p in ("icl-cpu", "icl-torch", "icl-explicit"))
        assert pick <= 1.10 * fastest, (s, pick, fastest)
        assert pick <= NOISE * times[(s, "published-eager")], (s, pick, times[(s, "published-eager")])
        ratio = times[(s, "icl-auto")] / pick
        assert 1 / NOISE_SAME_CODE <= ratio <= NOISE_SAME_CODE, (s, ratio)
