"""Tests of the fused momentum prototype update (prototype_update_,
masked_prototype_update_, PrototypeMemory) on every backend available here.

The oracle is icl_kernels.reference.prototype_update_math (the naive one-hot
product) in float64 plus the update rule written out below.
"""
import os
import tempfile

import pytest
import torch

import icl_kernels
from icl_kernels import PrototypeMemory, masked_prototype_update_, prototype_update_
from icl_kernels import reference as R
from icl_kernels.backends import available_backends

OP = "prototype_update"
CPU_BACKENDS = [b for b in ("cpu", "torch", "triton") if available_backends(OP, "cpu")[b] is None]
GRADCHECK_BACKENDS = [b for b in ("cpu", "torch") if b in CPU_BACKENDS]
SPATIAL = {"1d": (50,), "2d": (9, 11), "3d": (4, 5, 6)}
K, C = 5, 6


def bits(t):
    t = t.detach().contiguous()
    return t.view({torch.float64: torch.int64, torch.float32: torch.int32}[t.dtype])


def make_labels(B, spatial, pattern, gen, num_classes=K, absent=3, ignore_index=-100):
    n = int(torch.tensor(spatial).prod())
    if pattern == "random":
        lab = torch.randint(0, num_classes, (B, n), generator=gen)
    elif pattern == "constant":  # one class per sample
        lab = (torch.arange(B) % num_classes).view(B, 1).expand(B, n).clone()
        lab[lab == absent] = 0
    else:  # piecewise constant, like a segmentation map
        lab = ((torch.arange(n) // 7 + torch.arange(B).view(B, 1) * 3) % num_classes).expand(B, n).clone()
    lab[lab == absent] = 0  # one class never appears
    lab[torch.rand(B, n, generator=gen) < 0.15] = ignore_index
    return lab.view(B, *spatial)


def make_features(B, spatial, layout, gen, dtype=torch.float64, channels=C):
    if layout == "contiguous":
        return torch.randn(B, channels, *spatial, generator=gen, dtype=dtype)
    if layout == "channels_last":
        return torch.randn(B, *spatial, channels, generator=gen, dtype=dtype).movedim(-1, 1)
    # sliced: a non-dense view along the last spatial axis
    wide = torch.randn(B, channels, *spatial[:-1], 2 * spatial[-1], generator=gen, dtype=dtype)
    return wide[..., ::2]


def expected_update(buffer, means, totals, momentum, initialized):
    """The update rule, written out: returns (new buffer, new flags)."""
    new = buffer.clone()
    flags = None if initialized is None else initialized.clone()
    for k in range(buffer.shape[0]):
        if totals[k] <= 0:
            continue
        if initialized is not None and not initialized[k]:
            new[k] = means[k].to(buffer.dtype)
            flags[k] = True
        else:
            new[k] = momentum * buffer[k] + (1 - momentum) * means[k].to(buffer.dtype)
    return new, flags


def oracle_means(sums, totals):
    present = totals > 0
    return torch.where(present[:, None], sums / torch.where(present, totals, 1.0)[:, None], 0.0)


def close(a, b, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(a.to(torch.float64), b.to(torch.float64), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- float64 against the oracle


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dims", list(SPATIAL))
@pytest.mark.parametrize("pattern", ["random", "blocky", "constant"])
def test_labels_match_reference(backend, dims, pattern):
    gen = torch.Generator().manual_seed(1)
    spatial = SPATIAL[dims]
    for layout in ("contiguous", "channels_last", "sliced"):
        if backend == "triton" and layout != "contiguous" and dims != "2d":
            continue  # the interpreter is slow: strides are covered once
        feats = make_features(2, spatial, layout, gen)
        labels = make_labels(2, spatial, pattern, gen)
        buf0 = torch.randn(K, C, generator=gen, dtype=torch.float64)
        init0 = torch.tensor([True, False, True, True, False])
        buf, init = buf0.clone(), init0.clone()
        f = feats.detach().requires_grad_()
        means, totals = masked_prototype_update_(buf, f, labels=labels, momentum=0.7, initialized=init, backend=backend)

        fr = feats.detach().requires_grad_()
        sums_r, totals_r = R.prototype_update_math(fr.flatten(2), labels.flatten(1), num_classes=K)
        means_r = oracle_means(sums_r, totals_r)
        close(means, means_r)
        close(totals, totals_r)
        want_buf, want_init = expected_update(buf0, means_r.detach(), totals_r, 0.7, init0)
        close(buf, want_buf)
        assert torch.equal(init, want_init)
        assert torch.equal(bits(buf[3]), bits(buf0[3]))  # absent class: bit for bit
        assert float(totals[3].detach()) == 0.0 and torch.all(means[3] == 0)

        g = torch.randn(K, C, generator=gen, dtype=torch.float64)
        (means * g).sum().backward()
        (means_r * g).sum().backward()
        close(f.grad, fr.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dims", list(SPATIAL))
def test_probs_match_reference(backend, dims):
    gen = torch.Generator().manual_seed(2)
    spatial = SPATIAL[dims]
    for layout in ("contiguous", "channels_last"):
        if backend == "triton" and layout != "contiguous" and dims != "2d":
            continue
        feats = make_features(2, spatial, layout, gen)
        probs = torch.softmax(torch.randn(2, K, *spatial, generator=gen, dtype=torch.float64), dim=1)
        probs[:, 3] = 0.0  # an absent class
        buf0 = torch.randn(K, C, generator=gen, dtype=torch.float64)
        buf = buf0.clone()
        f = feats.detach().requires_grad_()
        p = probs.detach().requires_grad_()
        means, totals = masked_prototype_update_(buf, f, probs=p, momentum=0.9, backend=backend)

        fr = feats.detach().requires_grad_()
        pr = probs.detach().requires_grad_()
        sums_r, totals_r = R.prototype_update_math(fr.flatten(2), probs=pr.flatten(2))
        means_r = oracle_means(sums_r, totals_r)
        close(means, means_r)
        close(totals, totals_r)
        want_buf, _ = expected_update(buf0, means_r.detach(), totals_r, 0.9, None)
        close(buf, want_buf)
        assert torch.equal(bits(buf[3]), bits(buf0[3]))

        g = torch.randn(K, C, generator=gen, dtype=torch.float64)
        gt = torch.randn(K, generator=gen, dtype=torch.float64)
        ((means * g).sum() + (totals * gt).sum()).backward()
        ((means_r * g).sum() + (totals_r * gt).sum()).backward()
        close(f.grad, fr.grad)
        close(p.grad, pr.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_values_form_matches_reference(backend):
    gen = torch.Generator().manual_seed(3)
    B = 4
    values = torch.randn(B, K, C, generator=gen, dtype=torch.float64)
    weights = torch.rand(B, K, generator=gen, dtype=torch.float64) + 0.5
    weights[:, 3] = 0.0  # class 3 absent everywhere
    weights[1, 0] = 0.0
    values[1, 0] = float("nan")  # a dropped vector may hold anything
    buf0 = torch.randn(K, C, generator=gen, dtype=torch.float64)
    buf = buf0.clone()
    v = values.detach().requires_grad_()
    w = weights.detach().requires_grad_()
    means, totals = prototype_update_(buf, v, w, momentum=0.8, backend=backend)

    clean = torch.where(weights.unsqueeze(-1) != 0, values, 0.0)
    vr = clean.detach().requires_grad_()
    wr = weights.detach().requires_grad_()
    sums_r = torch.einsum("bk,bkc->kc", wr, vr)
    totals_r = wr.sum(0)
    means_r = oracle_means(sums_r, totals_r)
    close(means, means_r)
    close(totals, totals_r)
    assert torch.isfinite(means).all()
    close(buf, expected_update(buf0, means_r.detach(), totals_r, 0.8, None)[0])
    assert torch.equal(bits(buf[3]), bits(buf0[3]))

    g = torch.randn(K, C, generator=gen, dtype=torch.float64)
    (means * g).sum().backward()
    (means_r * g).sum().backward()
    close(v.grad, vr.grad)
    # weights: the true derivative, except at the dropped (NaN) entry
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[1, 0] = False
    close(w.grad[mask], wr.grad[mask])

    # uniform weights: the plain batch mean
    buf = torch.zeros(K, C, dtype=torch.float64)
    means, totals = prototype_update_(buf, values[[0, 2, 3]], momentum=0.0, backend=backend)
    close(means, values[[0, 2, 3]].mean(0))
    close(totals, torch.full((K,), 3.0, dtype=torch.float64))
    close(buf, means)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_backend_kernels_match_torch_kernels(backend, layout):
    """The backend entry points against the torch backend's, weighted labels
    included (a combination the public functions only reach through the values form)."""
    from icl_kernels import backends

    gen = torch.Generator().manual_seed(15)
    Kc, Cc, N = 8, 5, 700 if backend != "triton" else 90  # > 4 classes per tile, C not a multiple of 4 or 8
    feats = make_features(3, (N,), layout, gen, channels=Cc)
    labels = torch.randint(-1, Kc, (3, N), generator=gen)
    labels[labels == -1] = -100
    weights = torch.rand(3, N, generator=gen, dtype=torch.float64)
    weights[:, ::5] = 0.0
    probs = torch.rand(3, Kc, N, generator=gen, dtype=torch.float64)
    G = torch.randn(Kc, Cc, generator=gen, dtype=torch.float64)
    gt = torch.randn(Kc, generator=gen, dtype=torch.float64)
    fwd, bwd = backends.resolve(OP, backend, feats.device).kernels(OP)
    fwd_r, bwd_r = backends.resolve(OP, "torch", feats.device).kernels(OP)
    for w in (None, weights):
        out = fwd(feats, labels, w, None, Kc, -100, True, True)
        ref = fwd_r(feats, labels, w, None, Kc, -100, True, True)
        for a, b in zip(out, ref):
            close(a, b)
        out = bwd(G, gt, feats, labels, w, None, -100, True, w is not None)
        ref = bwd_r(G, gt, feats, labels, w, None, -100, True, w is not None)
        for a, b in zip(out, ref):
            if b is not None:
                close(a, b)
    for a, b in zip(fwd(feats, None, None, probs, Kc, -100, False, True),
                    fwd_r(feats, None, None, probs, Kc, -100, False, True)):
        close(a, b)
    for a, b in zip(bwd(G, gt, feats, None, None, probs, -100, True, True),
                    bwd_r(G, gt, feats, None, None, probs, -100, True, True)):
        close(a, b)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs Triton's interpreter")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_many_classes_in_several_blocks(dtype):
    """K = 150 classes: the forward splits them over programs (blocks of <= 64), the
    probs backward loops over blocks of <= 32; against the torch backend's kernels."""
    from icl_kernels import backends
    from icl_kernels.triton import prototype_update as tpu

    gen = torch.Generator().manual_seed(16)
    Kc, Cc, N = 150, 20, 48
    assert tpu._forward_blocks(Kc, Cc, dtype, False, False).num_kb(Kc) > 1
    assert tpu._probs_backward_blocks(Kc, Cc, dtype).num_kb(Kc) > 1
    feats = make_features(2, (N,), "contiguous", gen, dtype=dtype, channels=Cc)
    labels = torch.randint(0, Kc, (2, N), generator=gen)
    labels[:, ::7] = -100
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weights = torch.rand(2, N, generator=gen, dtype=torch.float64).to(acc)
    probs = torch.softmax(torch.randn(2, Kc, N, generator=gen, dtype=torch.float64), 1).to(dtype)
    G = torch.randn(Kc, Cc, generator=gen, dtype=torch.float64).to(acc)
    gt = torch.randn(Kc, generator=gen, dtype=torch.float64).to(acc)
    fwd, bwd = backends.resolve(OP, "triton", feats.device).kernels(OP)
    fwd_r, bwd_r = backends.resolve(OP, "torch", feats.device).kernels(OP)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for deterministic in (True, False):
        for w in (None, weights):
            for a, b in zip(fwd(feats, labels, w, None, Kc, -100, True, deterministic),
                            fwd_r(feats, labels, w, None, Kc, -100, True, deterministic)):
                close(a, b, **tol)
        for a, b in zip(fwd(feats, None, None, probs, Kc, -100, False, deterministic),
                        fwd_r(feats, None, None, probs, Kc, -100, False, deterministic)):
            close(a, b, **tol)
    for need_f, need_p in ((True, True), (True, False), (False, True)):
        out = bwd(G, gt, feats, None, None, probs, -100, need_f, need_p)
        ref = bwd_r(G, gt, feats, None, None, probs, -100, need_f, need_p)
        for a, b in zip(out, ref):
            if b is not None:
                close(a, b, **tol)
    bad = labels.clone()
    bad[1, 5] = Kc + 3
    with pytest.raises(ValueError, match="labels"):
        fwd(feats, bad, None, None, Kc, -100, True, True)


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
def test_gradcheck(backend):
    gen = torch.Generator().manual_seed(4)
    feats = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (2, 4, 5), generator=gen)
    labels[0, 0, :2] = -100
    probs = torch.softmax(torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64), 1).requires_grad_()
    values = torch.randn(3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = (torch.rand(3, 3, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()

    def labelled(f):
        return masked_prototype_update_(torch.zeros(3, 3, dtype=torch.float64), f, labels=labels, momentum=0.5,
                                        backend=backend)

    def soft(f, p):
        return masked_prototype_update_(torch.zeros(3, 3, dtype=torch.float64), f, probs=p, momentum=0.5,
                                        backend=backend)

    def vectors(v, w):
        return prototype_update_(torch.zeros(3, 3, dtype=torch.float64), v, w, momentum=0.5, backend=backend)

    assert torch.autograd.gradcheck(labelled, (feats,))
    assert torch.autograd.gradcheck(soft, (feats, probs))
    assert torch.autograd.gradcheck(vectors, (values, weights))


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("form", ["labels", "probs", "values"])
def test_eager_node_equals_registered_op(monkeypatch, backend, form):
    """Eager calls run one autograd node over the kernels (sums, totals and the
    division); the registered op path (what tracing takes) gives the same values
    bit for bit and the same gradients."""
    import icl_kernels.ops.prototype_update as pu

    gen = torch.Generator().manual_seed(6)
    feats = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 5, 6), generator=gen)
    labels[labels == 2] = 0  # class 2 absent: zero mean, zero gradient
    probs = torch.softmax(torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64), 1)
    values = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    weights = torch.rand(2, 3, generator=gen, dtype=torch.float64)
    weights[:, 1] = 0
    g_means = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    g_totals = torch.randn(3, generator=gen, dtype=torch.float64)
    results = []
    for eager in (True, False):
        if not eager:
            monkeypatch.setattr(pu, "eager_path", lambda *t: False)
        ins = [t.clone().requires_grad_() for t in ((feats, probs) if form == "probs" else (feats,) if form == "labels"
                                                       else (values, weights))]
        buf = torch.zeros(3, 4, dtype=torch.float64)
        init = torch.zeros(3, dtype=torch.bool)
        if form == "values":
            means, totals = prototype_update_(buf, ins[0], ins[1], momentum=0.9, initialized=init, backend=backend)
        elif form == "probs":
            means, totals = masked_prototype_update_(buf, ins[0], probs=ins[1], momentum=0.9, initialized=init,
                                                     backend=backend)
        else:
            means, totals = masked_prototype_update_(buf, ins[0], labels=labels, momentum=0.9, initialized=init,
                                                     backend=backend)
        node = type(means.grad_fn).__name__
        loss = (means * g_means).sum() + ((totals * g_totals).sum() if totals.requires_grad else 0)
        grads = torch.autograd.grad(loss, ins)
        results.append((node, means.detach(), totals.detach(), buf, init, grads))
    (n_e, m_e, t_e, b_e, i_e, g_e), (n_r, m_r, t_r, b_r, i_r, g_r) = results
    assert n_e == "_EagerClassMeansBackward" and n_r != n_e
    assert torch.equal(bits(m_e), bits(m_r)) and torch.equal(t_e, t_r)
    assert torch.equal(bits(b_e), bits(b_r)) and torch.equal(i_e, i_r)
    for a, b in zip(g_e, g_r):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_absent_class_has_zero_mean_and_gradient(backend):
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(2, C, 7, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 2, (2, 7, 8), generator=gen)  # classes 2..4 absent
    buf0 = torch.randn(K, C, generator=gen, dtype=torch.float64)
    buf = buf0.clone()
    means, totals = masked_prototype_update_(buf, feats, labels=labels, momentum=0.5, backend=backend)
    assert torch.equal(bits(buf[2:]), bits(buf0[2:]))
    assert torch.all(means[2:] == 0) and torch.all(totals[2:] == 0)
    means[2:].sum().backward()
    assert torch.all(feats.grad == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_ignored_batch(backend):
    feats = torch.randn(2, C, 5, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.full((2, 5, 6), 255)
    buf0 = torch.randn(K, C, dtype=torch.float64)
    buf, init = buf0.clone(), torch.zeros(K, dtype=torch.bool)
    means, totals = masked_prototype_update_(buf, feats, labels=labels, momentum=0.5, ignore_index=255,
                                             initialized=init, backend=backend)
    assert torch.equal(bits(buf), bits(buf0))
    assert not init.any()
    assert torch.all(totals == 0) and torch.all(means == 0)
    means.sum().backward()
    assert torch.all(feats.grad == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batch_of_one_and_small_label_dtypes(backend):
    gen = torch.Generator().manual_seed(6)
    feats = torch.randn(1, C, 6, 7, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, K, (1, 6, 7), generator=gen)
    sums_r, totals_r = R.prototype_update_math(feats.flatten(2), labels.flatten(1), num_classes=K)
    for dtype in (torch.int64, torch.int32, torch.uint8, torch.int16):
        buf = torch.zeros(K, C, dtype=torch.float64)
        means, totals = masked_prototype_update_(buf, feats, labels=labels.to(dtype), momentum=0.0, backend=backend)
        close(means, oracle_means(sums_r, totals_r))
        close(totals, totals_r)


def test_ignore_index_inside_the_class_range():
    """ignore_index may name a real class id (e.g. 0 = background to skip)."""
    feats = torch.randn(2, C, 30, dtype=torch.float64)
    labels = torch.randint(0, K, (2, 30))
    for backend in CPU_BACKENDS:
        buf = torch.zeros(K, C, dtype=torch.float64)
        _, totals = masked_prototype_update_(buf, feats, labels=labels, momentum=0.0, ignore_index=0, backend=backend)
        assert float(totals[0]) == 0.0
        assert float(totals.sum()) == float((labels != 0).sum())


def test_skipped_voxels_may_hold_nan():
    gen = torch.Generator().manual_seed(7)
    feats = torch.randn(2, C, 40, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, K, (2, 40), generator=gen)
    labels[:, ::3] = -100
    feats[:, :, ::3] = float("nan")
    for backend in CPU_BACKENDS:
        buf = torch.zeros(K, C, dtype=torch.float64)
        means, _ = masked_prototype_update_(buf, feats, labels=labels, momentum=0.0, backend=backend)
        assert torch.isfinite(means).all() and torch.isfinite(buf).all(), backend


@pytest.mark.parametrize("backend", [b for b in ("cpu", "torch") if b in CPU_BACKENDS])
def test_reduced_precision_features_on_cpu(backend):
    gen = torch.Generator().manual_seed(8)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        feats = torch.randn(2, C, 64, 33, generator=gen).to(dtype)
        labels = make_labels(2, (64, 33), "blocky", gen)
        probs = torch.softmax(torch.randn(2, K, 64, 33, generator=gen), 1).to(dtype)
        for kw in ({"labels": labels}, {"probs": probs}):
            buf = torch.zeros(K, C)
            means, totals = masked_prototype_update_(buf, feats, momentum=0.0, backend=backend, **kw)
            assert means.dtype == dtype and totals.dtype == torch.float32
            if "labels" in kw:
                sums_r, totals_r = R.prototype_update_math(feats.double().flatten(2), labels.flatten(1), num_classes=K)
            else:
                sums_r, totals_r = R.prototype_update_math(feats.double().flatten(2), probs=probs.double().flatten(2))
            close(buf, oracle_means(sums_r, totals_r), rtol=1e-4, atol=1e-5)


def test_initialized_copy_then_blend():
    mem = PrototypeMemory(K, C, momentum=0.9, dtype=torch.float64)
    gen = torch.Generator().manual_seed(9)
    v1 = torch.randn(2, K, C, generator=gen, dtype=torch.float64)
    w1 = torch.ones(2, K, dtype=torch.float64)
    w1[:, 4] = 0  # class 4 not seen in the first update
    mem.update(v1, w1)
    close(mem.prototypes[:4], v1[:, :4].mean(0))  # copied, not 0.1 * mean
    assert torch.all(mem.prototypes[4] == 0)
    assert mem.initialized.tolist() == [True, True, True, True, False]
    v2 = torch.randn(2, K, C, generator=gen, dtype=torch.float64)
    mem.update(v2)
    close(mem.prototypes[:4], 0.9 * v1[:, :4].mean(0) + 0.1 * v2[:, :4].mean(0))
    close(mem.prototypes[4], v2[:, 4].mean(0))  # first sighting copies
    assert mem.initialized.all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deterministic(backend):
    gen = torch.Generator().manual_seed(10)
    shape = (2, 8, 9000) if backend != "triton" else (2, 8, 600)
    feats = torch.randn(*shape, generator=gen)
    labels = make_labels(shape[0], shape[2:], "random", gen)
    probs = torch.softmax(torch.randn(shape[0], K, shape[2], generator=gen), 1)
    outs = []
    threads = torch.get_num_threads()
    try:
        for run in range(2):
            if backend == "cpu":
                torch.set_num_threads(1 if run == 0 else max(2, threads))  # the partition ignores the thread count
            bl, bp = torch.zeros(K, 8), torch.zeros(K, 8)
            masked_prototype_update_(bl, feats, labels=labels, momentum=0.5, backend=backend)
            masked_prototype_update_(bp, feats, probs=probs, momentum=0.5, backend=backend)
            outs.append((bl, bp))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(bits(outs[0][0]), bits(outs[1][0]))
    assert torch.equal(bits(outs[0][1]), bits(outs[1][1]))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_invalid_labels_raise(backend):
    feats = torch.randn(2, C, 10)
    for bad in (K, -1, 99):
        labels = torch.zeros(2, 10, dtype=torch.long)
        labels[1, 7] = bad
        buf = torch.zeros(K, C)
        with pytest.raises(ValueError, match="labels must be in"):
            masked_prototype_update_(buf, feats, labels=labels, momentum=0.5, backend=backend)
        # check_labels=False does not turn the check off on CPU
        with pytest.raises(ValueError, match="labels must be in"):
            masked_prototype_update_(buf, feats, labels=labels, momentum=0.5, check_labels=False, backend=backend)
        assert torch.all(buf == 0)


def test_bad_arguments_name_the_argument():
    buf = torch.zeros(K, C)
    feats = torch.randn(2, C, 4, 4)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    probs = torch.rand(2, K, 4, 4)
    cases = [
        (dict(features=feats.long(), labels=labels), "features must be a floating"),
        (dict(features=torch.randn(2, C + 1, 4, 4), labels=labels), "features has C="),
        (dict(features=torch.randn(2, C), labels=labels), "features must be \\[B, C, \\*spatial\\]"),
        (dict(features=feats), "exactly one of labels"),
        (dict(features=feats, labels=labels, probs=probs), "exactly one of labels"),
        (dict(features=feats, labels=labels[:, :3]), "labels must be \\[B, \\*spatial\\]"),
        (dict(features=feats, labels=labels.float()), "labels must be an integer"),
        (dict(features=feats, probs=probs[:, :2]), "probs must be \\[B, K, \\*spatial\\]"),
        (dict(features=feats, probs=probs.long()), "probs must be a floating"),
        (dict(features=feats, labels=labels, momentum=1.5), "momentum must be in \\[0, 1\\]"),
        (dict(features=feats, labels=labels, momentum=-0.1), "momentum must be in \\[0, 1\\]"),
        (dict(features=feats, labels=labels, initialized=torch.zeros(K)), "initialized must be a bool"),
        (dict(features=feats, labels=labels, initialized=torch.zeros(K + 1, dtype=torch.bool)), "initialized must be"),
        (dict(features=feats, labels=labels, ignore_index=1.5), "ignore_index must be an int"),
    ]
    for kwargs, msg in cases:
        kwargs.setdefault("momentum", 0.5)
        with pytest.raises(ValueError, match=msg):
            masked_prototype_update_(buf, **kwargs)
    with pytest.raises(ValueError, match="buffer must be \\[K, C\\]"):
        masked_prototype_update_(torch.zeros(K), feats, labels=labels, momentum=0.5)
    with pytest.raises(ValueError, match="values must be \\[B, K, C\\]"):
        prototype_update_(buf, torch.randn(2, K + 1, C), momentum=0.5)
    with pytest.raises(ValueError, match="values must be a floating"):
        prototype_update_(buf, torch.ones(2, K, C, dtype=torch.long), momentum=0.5)
    with pytest.raises(ValueError, match="weights must be \\[B, K\\]"):
        prototype_update_(buf, torch.randn(2, K, C), torch.ones(2, K + 1), momentum=0.5)
    with pytest.raises(ValueError, match="momentum must be"):
        prototype_update_(buf, torch.randn(2, K, C), momentum=None)
    with pytest.raises(ValueError, match="backend must be one of"):
        prototype_update_(buf, torch.randn(2, K, C), momentum=0.5, backend="nope")
    assert torch.all(buf == 0)


def test_environment_selects_the_backend(monkeypatch):
    monkeypatch.setenv("ICL_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ICL_KERNELS_BACKEND"):
        prototype_update_(torch.zeros(K, C), torch.randn(2, K, C), momentum=0.5)
    monkeypatch.setenv("ICL_KERNELS_BACKEND", "torch")
    buf = torch.zeros(K, C)
    prototype_update_(buf, torch.ones(2, K, C), momentum=0.5)
    assert torch.all(buf == 0.5)


def test_available_backends_lists_the_op():
    avail = icl_kernels.available_backends(OP, "cpu")
    assert avail["torch"] is None
    assert "cuda" in avail and avail["cuda"] is not None  # no GPU here, or not built


# ---------------------------------------------------------------- torch.library / torch.compile


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
def test_opcheck(backend):
    gen = torch.Generator().manual_seed(11)
    f = torch.randn(2, 4, 30, generator=gen, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(-1, 3, (2, 30), generator=gen)
    w = (torch.rand(2, 30, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    p = torch.rand(2, 3, 30, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    gt = torch.randn(3, generator=gen, dtype=torch.float64)
    sums_op = torch.ops.icl_kernels.prototype_class_sums.default
    back_op = torch.ops.icl_kernels.prototype_class_sums_backward.default
    torch.library.opcheck(sums_op, (f, lab, None, None, 3, -1, True, True, backend))
    torch.library.opcheck(sums_op, (f, lab, w, None, 3, -1, True, True, backend))
    torch.library.opcheck(sums_op, (f, None, None, p, 3, -100, False, True, backend))
    fd, wd, pd = f.detach(), w.detach(), p.detach()
    torch.library.opcheck(back_op, (g, gt, fd, lab, None, None, -1, True, False, backend))
    torch.library.opcheck(back_op, (g, gt, fd, lab, wd, None, -1, True, True, backend))
    torch.library.opcheck(back_op, (g, gt, fd, None, None, pd, -100, True, True, backend))
    if backend == "cpu":  # the raw compiled kernels
        ops = torch.ops.icl_kernels
        torch.library.opcheck(ops._prototype_update_labels_forward.default, (fd, lab, wd, 3, -1, True, True))
        torch.library.opcheck(ops._prototype_update_labels_backward.default, (g, gt, fd, lab, wd, -1, True, True))
        torch.library.opcheck(ops._prototype_update_probs_forward.default, (fd, pd, True))
        torch.library.opcheck(ops._prototype_update_probs_backward.default, (g, gt, fd, pd, True, True))


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(12)
    feats = torch.randn(2, C, 8, 9, generator=gen, dtype=torch.float64)
    labels = make_labels(2, (8, 9), "random", gen)
    values = torch.randn(3, K, C, generator=gen, dtype=torch.float64)

    def step(buf, init, f, lab, v):
        means, totals = masked_prototype_update_(buf, f, labels=lab, momentum=0.9, initialized=init)
        means2, _ = prototype_update_(buf, v, momentum=0.5)
        return (means * 2).sum() + means2.sum(), totals

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if os.environ.get("ICL_FAST_COMPILE") else "inductor")
    results = []
    for fn in (step, compiled):
        buf, init = torch.zeros(K, C, dtype=torch.float64), torch.zeros(K, dtype=torch.bool)
        f = feats.clone().requires_grad_()
        loss, totals = fn(buf, init, f, labels, values)
        loss.backward()
        results.append((buf, init, f.grad, totals))
    (b0, i0, g0, t0), (b1, i1, g1, t1) = results
    close(b1, b0, rtol=1e-13, atol=1e-14)
    assert torch.equal(i0, i1)
    close(g1, g0, rtol=1e-13, atol=1e-14)
    close(t1, t0)


# ---------------------------------------------------------------- module


def test_prototype_memory_state_dict_and_to():
    gen = torch.Generator().manual_seed(13)
    mem = PrototypeMemory(K, C, momentum=0.9)
    mem.update_from_features(torch.randn(2, C, 6, 6, generator=gen), labels=torch.randint(0, 3, (2, 6, 6), generator=gen))
    sd = mem.state_dict()
    assert set(sd) == {"prototypes", "initialized"}
    other = PrototypeMemory(K, C, momentum=0.9)
    other.load_state_dict(sd)
    assert torch.equal(other.prototypes, mem.prototypes) and torch.equal(other.initialized, mem.initialized)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mem.pt")
        torch.save(mem.state_dict(), path)
        again = PrototypeMemory(K, C)
        again.load_state_dict(torch.load(path))
        assert torch.equal(again.prototypes, mem.prototypes)
    mem64 = mem.to(torch.float64)
    assert mem64.prototypes.dtype == torch.float64 and mem64.initialized.dtype == torch.bool
    means, _ = mem64.update_from_features(torch.randn(2, C, 4, 4, dtype=torch.float64),
                                          probs=torch.softmax(torch.randn(2, K, 4, 4, dtype=torch.float64), 1))
    assert means.dtype == torch.float64 and mem64.initialized.all()
    out = mem64()
    assert torch.equal(out, mem64.prototypes) and out.data_ptr() != mem64.prototypes.data_ptr()
    assert "num_classes=5" in repr(mem64)
    with pytest.raises(ValueError, match="momentum"):
        PrototypeMemory(K, C, momentum=2.0)


# ---------------------------------------------------------------- data parallel (gloo, 2 processes)


def _dist_worker(rank, world, feats, labels, values, weights, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    # a file store: no TCP store server thread in rank 0 that its peer may still be using at exit
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                            world_size=world)
    try:
        half = feats.shape[0] // world
        sl = slice(rank * half, (rank + 1) * half)
        mem = PrototypeMemory(K, C, momentum=0.9, dtype=torch.float64)
        f = feats[sl].clone().requires_grad_()
        means, totals = mem.update_from_features(f, labels=labels[sl])
        means.sum().backward()
        v = values[sl].clone().requires_grad_()
        means_v, _ = mem.update(v, weights[sl])
        means_v.sum().backward()
        buf_nd = torch.zeros(K, C, dtype=torch.float64)
        masked_prototype_update_(buf_nd, feats[sl], labels=labels[sl], momentum=0.0, deterministic=False)
        torch.save({"buf": mem.prototypes, "init": mem.initialized, "totals": totals.detach(), "grad_f": f.grad,
                    "grad_v": v.grad, "buf_nd": buf_nd}, os.path.join(out_dir, f"rank{rank}.pt"))
        # both ranks leave their last collective before either tears gloo down: a rank that
        # destroys the group while its peer is still talking to it can abort in gloo's threads
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_single_process():
    import torch.multiprocessing as mp

    gen = torch.Generator().manual_seed(14)
    feats = torch.randn(4, C, 6, 7, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, K, (4, 6, 7), generator=gen)
    labels[:2][labels[:2] == 2] = 0  # class 2 only on rank 1: absence is judged globally
    labels[:, :, 0] = -100
    labels[labels == 4] = 1  # class 4 nowhere
    values = torch.randn(4, K, C, generator=gen, dtype=torch.float64)
    weights = torch.rand(4, K, generator=gen, dtype=torch.float64)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_dist_worker, args=(2, feats, labels, values, weights, tmp), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2))
    for key in ("buf", "init", "totals", "buf_nd"):
        assert torch.equal(r0[key], r1[key]) if key == "init" else torch.equal(bits(r0[key]), bits(r1[key])), key

    mem = PrototypeMemory(K, C, momentum=0.9, dtype=torch.float64)
    f = feats.clone().requires_grad_()
    means, totals = mem.update_from_features(f, labels=labels)
    means.sum().backward()
    v = values.clone().requires_grad_()
    means_v, _ = mem.update(v, weights)
    means_v.sum().backward()
    assert torch.equal(r0["init"], mem.initialized)
    assert float(totals[4].detach()) == 0 and float(r0["totals"][2]) > 0
    close(r0["buf"], mem.prototypes, rtol=1e-12, atol=0)
    close(r0["totals"], totals.detach(), rtol=1e-12, atol=0)
    # d means / d local inputs = 1 / global total: each rank holds its slice of the full gradient
    close(torch.cat([r0["grad_f"], r1["grad_f"]]), f.grad, rtol=1e-12, atol=1e-15)
    close(torch.cat([r0["grad_v"], r1["grad_v"]]), v.grad, rtol=1e-12, atol=1e-15)
    buf = torch.zeros(K, C, dtype=torch.float64)
    masked_prototype_update_(buf, feats, labels=labels, momentum=0.0)
    close(r0["buf_nd"], buf, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- GPU (skipped without one)

GPU_BACKENDS = ["cuda", "triton"]


def _gpu_case(dtype, layout="contiguous", pattern="blocky", Kc=5, Cc=40, spatial=(33, 47)):
    gen = torch.Generator().manual_seed(20)
    feats = make_features(2, spatial, layout, gen, dtype=torch.float32, channels=Cc).to(dtype)
    labels = make_labels(2, spatial, pattern, gen, num_classes=Kc, absent=Kc - 1)
    probs = torch.softmax(torch.randn(2, Kc, *spatial, generator=gen), 1).to(dtype)
    return feats, labels, probs


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("deterministic", [True, False])
def test_gpu_matches_reference(backend, dtype, layout, deterministic):
    for pattern in ("blocky", "random"):
        feats, labels, probs = _gpu_case(dtype, layout, pattern)
        Kc, Cc = probs.shape[1], feats.shape[1]
        tol = dict(rtol=1e-5, atol=1e-5) if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=2e-2)
        for kw in ({"labels": labels}, {"probs": probs}):
            # detach(): for float64, .double() is the tensor itself, and a reference copy that
            # requires grad would turn the next .cuda() copy into a non-leaf (no .grad)
            dev_kw = {k: v.detach().cuda() for k, v in kw.items()}
            f = feats.detach().cuda().requires_grad_()
            extra = {k: v.requires_grad_() for k, v in dev_kw.items() if v.dtype.is_floating_point}
            buf = torch.zeros(Kc, Cc, device="cuda")
            means, totals = masked_prototype_update_(buf, f, momentum=0.0, backend=backend,
                                                     deterministic=deterministic, **dev_kw)
            fr = feats.detach().double().requires_grad_()
            pr = probs.detach().double().requires_grad_() if "probs" in kw else None
            sums_r, totals_r = R.prototype_update_math(
                fr.flatten(2), labels.flatten(1) if "labels" in kw else None,
                probs=pr.flatten(2) if pr is not None else None, num_classes=Kc)
            means_r = oracle_means(sums_r, totals_r)
            close(means.cpu(), means_r, **tol)
            close(totals.cpu(), totals_r, **tol)
            close(buf.cpu(), means_r, **tol)
            g = torch.randn(Kc, Cc, dtype=torch.float64)
            (means.double() * g.cuda()).sum().backward()
            (means_r * g).sum().backward()
            close(f.grad.cpu(), fr.grad, **tol)
            if pr is not None:
                close(extra["probs"].grad.cpu(), pr.grad, **tol)
    # values form
    v = torch.randn(4, 5, 40, dtype=dtype)
    w = torch.rand(4, 5)
    buf = torch.zeros(5, 40, device="cuda")
    means, _ = prototype_update_(buf, v.cuda(), w.cuda(), momentum=0.0, backend=backend, deterministic=deterministic)
    ref = torch.einsum("bk,bkc->kc", w.double(), v.double()) / w.double().sum(0)[:, None]
    close(means.cpu(), ref, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_deterministic(backend):
    gen = torch.Generator().manual_seed(21)
    feats = torch.randn(2, 64, 96, 96, generator=gen).cuda()
    labels = torch.randint(0, 16, (2, 96, 96), generator=gen).cuda()
    probs = torch.softmax(torch.randn(2, 16, 96, 96, generator=gen), 1).cuda()
    outs = []
    for _ in range(3):
        b1, b2 = torch.zeros(16, 64, device="cuda"), torch.zeros(16, 64, device="cuda")
        masked_prototype_update_(b1, feats, labels=labels, momentum=0.5, backend=backend)
        masked_prototype_update_(b2, feats, probs=probs, momentum=0.5, backend=backend)
        outs.append((bits(b1.cpu()), bits(b2.cpu())))
    for o in outs[1:]:
        assert torch.equal(o[0], outs[0][0]) and torch.equal(o[1], outs[0][1])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS + ["torch"])
def test_gpu_check_labels(backend):
    feats = torch.randn(2, 8, 100, device="cuda")
    labels = torch.zeros(2, 100, dtype=torch.long, device="cuda")
    labels[1, 50] = 7
    buf = torch.zeros(4, 8, device="cuda")
    with pytest.raises(ValueError, match="labels must be in"):
        masked_prototype_update_(buf, feats, labels=labels, momentum=0.5, backend=backend)
    # unchecked, the bad label is skipped
    means, totals = masked_prototype_update_(buf, feats, labels=labels, momentum=0.0, check_labels=False, backend=backend)
    assert float(totals.sum()) == 199.0
