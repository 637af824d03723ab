"""Triton kernels of the fused proxy attention (forward and backward).

Same contract as ``icl_kernels.reference.proxy_attention_forward`` /
``proxy_attention_backward``.  Layout of the work:

Forward
    One program per (batch b, token range s, chunk of BLOCK_M query rows).
    It walks its token range in tiles of BLOCK_N tokens: loads the tile
    (any strides), normalises it on the fly when eps is given, computes the
    logits S = A xhat^T + c (reducing over C in chunks of BLOCK_C), stores
    them, and keeps an online softmax (running max, running sum, unnormalised
    Z).  It writes those three as a partial; ``_fwd_combine_kernel`` merges
    the partials of the token ranges in a fixed order into Z and lse.

Backward
    One program per (batch b, token range s).  For each tile of tokens it
    loops over all query rows in chunks of BLOCK_M, recomputes P from lse,
    forms dS, accumulates dxhat for the tile and dA/dc for its own token
    range, then applies the LayerNorm backward and writes dx: one pass over
    the tokens.  dA/dc partials are summed over token ranges in a fixed order
    by ``_reduce_splits_kernel`` (bitwise reproducible).

Accumulators that span all of C (Z, dxhat, dA) stay in registers when C fits
one chunk (and, for dA, M fits one chunk); otherwise they live in a small
program-private global buffer that is read, updated and written back chunk by
chunk, so any M and C work (M=256 with C=512 included).

Splits depend only on the shapes (never on timing), so results are
deterministic.  On the GPU every dot reduces over >= 16 elements (block sizes
are padded to >= 16); float32 dots use tf32x3 (float32-level accuracy, see
F32_DOT_PRECISION), half types their own tensor-core dots with float32
accumulation, float64 IEEE dots.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@triton.jit
def _load_x(x_base, n64, n_mask, c0, C, sxn, sxc, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """A [BLOCK_N, BLOCK_C] tile of raw tokens in ACC, zeros outside (n < end, c < C)."""
    cols = c0 + tl.arange(0, BLOCK_C)
    msk = n_mask[:, None] & (cols < C)[None, :]
    v = tl.load(x_base + n64[:, None] * sxn + cols[None, :] * sxc, mask=msk, other=0.0)
    return v.to(ACC), msk


@triton.jit
def _load_xhat(x_base, n64, n_mask, c0, C, sxn, sxc, mean, rstd,
               HAS_EPS: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """A normalised chunk of tokens (stats given); zeros outside the valid range."""
    v, msk = _load_x(x_base, n64, n_mask, c0, C, sxn, sxc, BLOCK_C, ACC)
    if HAS_EPS:
        v = tl.where(msk, (v - mean[:, None]) * rstd[:, None], 0.0)
    return v


@triton.jit
def _load_xhat_tile(x_base, n64, n_mask, C, sxn, sxc, eps,
                    HAS_EPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                    ACC: tl.constexpr):
    """All of C in one chunk: load once, exact two-pass statistics. Returns (xhat, rstd)."""
    v, msk = _load_x(x_base, n64, n_mask, 0, C, sxn, sxc, BLOCK_C, ACC)
    rstd = tl.full([BLOCK_N], 1.0, ACC)
    if HAS_EPS:
        mean = tl.sum(v, 1) / C
        d = tl.where(msk, v - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / C + eps)
        v = d * rstd[:, None]
    return v, rstd


@triton.jit
def _tile_stats(x_base, n64, n_mask, C, sxn, sxc, eps,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, NUM_CC: tl.constexpr,
                ACC: tl.constexpr):
    """Per-token mean and rstd over C read in chunks: each chunk's (mean, M2)
    is exact two-pass and chunks are merged with Chan's formula, which keeps
    the precision of the reference's centred variance (no E[x^2] - mean^2)."""
    mean = tl.zeros([BLOCK_N], ACC)
    m2 = tl.zeros([BLOCK_N], ACC)
    for k in range(NUM_CC):
        c0 = k * BLOCK_C
        v, msk = _load_x(x_base, n64, n_mask, c0, C, sxn, sxc, BLOCK_C, ACC)
        cnt = tl.minimum(C - c0, BLOCK_C).to(ACC)
        before = c0.to(ACC)
        mean_k = tl.sum(v, 1) / cnt
        d = tl.where(msk, v - mean_k[:, None], 0.0)
        delta = mean_k - mean
        tot = before + cnt
        mean = mean + delta * (cnt / tot)
        m2 = m2 + tl.sum(d * d, 1) + delta * delta * (before * cnt / tot)
    rstd = 1.0 / tl.sqrt(m2 / C + eps)
    return mean, rstd


@triton.jit
def _fwd_kernel(
    x_ptr, A_ptr, c_ptr, S_ptr, pmax_ptr, psum_ptr, pz_ptr,
    N, M, C, split_len, n_splits, n_mchunks,
    sxb, sxn, sxc, eps,
    HAS_EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    NUM_CC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    # Row chunks vary fastest so the programs sharing a token tile run together (L2 reuse of x).
    pid = tl.program_id(0)
    mc = pid % n_mchunks
    item = pid // n_mchunks                 # = b * n_splits + split
    split = item % n_splits
    b = (item // n_splits).to(tl.int64)
    item = item.to(tl.int64)

    m_offs = mc * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m_offs < M
    bias = tl.load(c_ptr + b * M + m_offs, mask=m_mask, other=0.0).to(ACC)
    x_base = x_ptr + b * sxb
    A_base = A_ptr + b * M * C
    pz_base = pz_ptr + item * M * C
    s_rows = S_ptr + (b * M + m_offs.to(tl.int64)) * N
    n_begin = split * split_len
    n_end = tl.minimum(n_begin + split_len, N)

    m_run = tl.full([BLOCK_M], float("-inf"), ACC)
    l_run = tl.zeros([BLOCK_M], ACC)
    c_ar = tl.arange(0, BLOCK_C)
    if NUM_CC == 1:
        a_blk = tl.load(A_base + m_offs[:, None] * C + c_ar[None, :],
                        mask=m_mask[:, None] & (c_ar < C)[None, :], other=0.0).to(DOT)
        z_acc = tl.zeros([BLOCK_M, BLOCK_C], ACC)

    for n0 in range(n_begin, n_end, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        n_mask = n_offs < n_end
        n64 = n_offs.to(tl.int64)
        if NUM_CC == 1:
            xt, _unused = _load_xhat_tile(x_base, n64, n_mask, C, sxn, sxc, eps,
                                          HAS_EPS, BLOCK_N, BLOCK_C, ACC)
            xd = xt.to(DOT)
            s = tl.dot(a_blk, tl.trans(xd), input_precision=PREC, out_dtype=ACC)
        else:
            mean = tl.zeros([BLOCK_N], ACC)
            rstd = tl.zeros([BLOCK_N], ACC)
            if HAS_EPS:
                mean, rstd = _tile_stats(x_base, n64, n_mask, C, sxn, sxc, eps,
                                         BLOCK_N, BLOCK_C, NUM_CC, ACC)
            s = tl.zeros([BLOCK_M, BLOCK_N], ACC)
            for k in range(NUM_CC):
                cols = k * BLOCK_C + c_ar
                xd = _load_xhat(x_base, n64, n_mask, k * BLOCK_C, C, sxn, sxc, mean, rstd,
                                HAS_EPS, BLOCK_C, ACC).to(DOT)
                a_c = tl.load(A_base + m_offs[:, None] * C + cols[None, :],
                              mask=m_mask[:, None] & (cols < C)[None, :], other=0.0).to(DOT)
                s = tl.dot(a_c, tl.trans(xd), acc=s, input_precision=PREC, out_dtype=ACC)
        s = s + bias[:, None]
        tl.store(s_rows[:, None] + n64[None, :], s.to(S_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])

        # Online softmax: every tile holds >= 1 valid token, so m_new is finite.
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(s, 1))
        alpha = tl.exp(m_run - m_new)
        p = tl.exp(s - m_new[:, None])
        l_run = l_run * alpha + tl.sum(p, 1)
        m_run = m_new
        pd = p.to(DOT)
        if NUM_CC == 1:
            z_acc = z_acc * alpha[:, None] + tl.dot(pd, xd, input_precision=PREC, out_dtype=ACC)
        else:
            # Z lives in this program's partial buffer; the first tile does not read it.
            not_first = n0 > n_begin
            for k in range(NUM_CC):
                cols = k * BLOCK_C + c_ar
                xd = _load_xhat(x_base, n64, n_mask, k * BLOCK_C, C, sxn, sxc, mean, rstd,
                                HAS_EPS, BLOCK_C, ACC).to(DOT)
                zmask = m_mask[:, None] & (cols < C)[None, :]
                zp = pz_base + m_offs[:, None] * C + cols[None, :]
                z = tl.load(zp, mask=zmask & not_first, other=0.0)
                z = z * alpha[:, None] + tl.dot(pd, xd, input_precision=PREC, out_dtype=ACC)
                tl.store(zp, z, mask=zmask)
            # The next tile re-reads what other threads of this program wrote.
            tl.debug_barrier()

    tl.store(pmax_ptr + item * M + m_offs, m_run, mask=m_mask)
    tl.store(psum_ptr + item * M + m_offs, l_run, mask=m_mask)
    if NUM_CC == 1:
        tl.store(pz_base + m_offs[:, None] * C + c_ar[None, :], z_acc,
                 mask=m_mask[:, None] & (c_ar < C)[None, :])


@triton.jit
def _fwd_combine_kernel(
    pmax_ptr, psum_ptr, pz_ptr, Z_ptr, lse_ptr,
    M, C, n_splits, n_mblocks, n_cblocks,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    cb = pid % n_cblocks
    mb = (pid // n_cblocks) % n_mblocks
    b = (pid // (n_cblocks * n_mblocks)).to(tl.int64)
    m_offs = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m_offs < M
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    zmask = m_mask[:, None] & (cols < C)[None, :]

    # Two passes over the token ranges, always in the same order.
    g = tl.full([BLOCK_M], float("-inf"), ACC)
    for s in range(n_splits):
        row = (b * n_splits + s) * M
        g = tl.maximum(g, tl.load(pmax_ptr + row + m_offs, mask=m_mask, other=0.0))
    total = tl.zeros([BLOCK_M], ACC)
    z = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for s in range(n_splits):
        row = (b * n_splits + s) * M
        w = tl.exp(tl.load(pmax_ptr + row + m_offs, mask=m_mask, other=0.0) - g)
        total += w * tl.load(psum_ptr + row + m_offs, mask=m_mask, other=0.0)
        zs = tl.load(pz_ptr + (row + m_offs[:, None]) * C + cols[None, :], mask=zmask, other=0.0)
        z += w[:, None] * zs
    total = tl.where(m_mask, total, 1.0)
    z = z / total[:, None]
    tl.store(Z_ptr + (b * M + m_offs[:, None]) * C + cols[None, :], z.to(Z_ptr.dtype.element_ty),
             mask=zmask)
    tl.store(lse_ptr + b * M + m_offs, g + tl.log(total), mask=m_mask & (cb == 0))


@triton.jit
def _bwd_kernel(
    x_ptr, A_ptr, c_ptr, lse_ptr, dZ_ptr, D_ptr, gS_ptr, dx_ptr, pdA_ptr, pdc_ptr, scr_ptr,
    N, M, C, split_len, n_splits,
    sxb, sxn, sxc, sdb, sdn, sdc, sgb, sgm, sgn, eps,
    HAS_EPS: tl.constexpr, HAS_DZ: tl.constexpr, HAS_GS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    NUM_MC: tl.constexpr, NUM_CC: tl.constexpr, DA_IN_REGS: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    item = tl.program_id(0)                 # = b * n_splits + split
    split = item % n_splits
    b = (item // n_splits).to(tl.int64)
    item = item.to(tl.int64)

    x_base = x_ptr + b * sxb
    dx_base = dx_ptr + b * sdb
    A_base = A_ptr + b * M * C
    dZ_base = dZ_ptr + b * M * C
    gS_base = gS_ptr + b * sgb
    pdA_base = pdA_ptr + item * M * C
    pdc_base = pdc_ptr + item * M
    scr_base = scr_ptr + item * BLOCK_N * C  # dxhat of the current tile when C is chunked
    n_begin = split * split_len
    n_end = tl.minimum(n_begin + split_len, N)
    c_ar = tl.arange(0, BLOCK_C)
    m_ar = tl.arange(0, BLOCK_M)
    t_ar = tl.arange(0, BLOCK_N)

    if DA_IN_REGS:
        # All rows and channels fit one block: everything stays in registers.
        m_mask = m_ar < M
        blk_mask = m_mask[:, None] & (c_ar < C)[None, :]
        a_blk = tl.load(A_base + m_ar[:, None] * C + c_ar[None, :], mask=blk_mask, other=0.0).to(DOT)
        if HAS_DZ:
            dz_blk = tl.load(dZ_base + m_ar[:, None] * C + c_ar[None, :], mask=blk_mask,
                             other=0.0).to(DOT)
            D_m = tl.load(D_ptr + b * M + m_ar, mask=m_mask, other=0.0)
        bias = tl.load(c_ptr + b * M + m_ar, mask=m_mask, other=0.0).to(ACC)
        lse = tl.load(lse_ptr + b * M + m_ar, mask=m_mask, other=0.0).to(ACC)
        dA_acc = tl.zeros([BLOCK_M, BLOCK_C], ACC)
        dc_acc = tl.zeros([BLOCK_M], ACC)

    for n0 in range(n_begin, n_end, BLOCK_N):
        n_offs = n0 + t_ar
        n_mask = n_offs < n_end
        n64 = n_offs.to(tl.int64)
        not_first_tile = n0 > n_begin
        mean = tl.zeros([BLOCK_N], ACC)
        rstd = tl.full([BLOCK_N], 1.0, ACC)
        if NUM_CC == 1:
            xt, rstd = _load_xhat_tile(x_base, n64, n_mask, C, sxn, sxc, eps,
                                       HAS_EPS, BLOCK_N, BLOCK_C, ACC)
            xd = xt.to(DOT)
            dxh = tl.zeros([BLOCK_N, BLOCK_C], ACC)
        elif HAS_EPS:
            mean, rstd = _tile_stats(x_base, n64, n_mask, C, sxn, sxc, eps,
                                     BLOCK_N, BLOCK_C, NUM_CC, ACC)

        for mc in range(NUM_MC):
            if not DA_IN_REGS:
                m_offs = mc * BLOCK_M + m_ar
                m_mask = m_offs < M
                bias = tl.load(c_ptr + b * M + m_offs, mask=m_mask, other=0.0).to(ACC)
                lse = tl.load(lse_ptr + b * M + m_offs, mask=m_mask, other=0.0).to(ACC)
                if HAS_DZ:
                    D_m = tl.load(D_ptr + b * M + m_offs, mask=m_mask, other=0.0)
                if NUM_CC == 1:
                    blk_mask = m_mask[:, None] & (c_ar < C)[None, :]
                    a_blk = tl.load(A_base + m_offs[:, None] * C + c_ar[None, :], mask=blk_mask,
                                    other=0.0).to(DOT)
                    if HAS_DZ:
                        dz_blk = tl.load(dZ_base + m_offs[:, None] * C + c_ar[None, :],
                                         mask=blk_mask, other=0.0).to(DOT)
            else:
                m_offs = m_ar

            # Logits and dP = dZ . xhat for this block of rows.
            if NUM_CC == 1:
                s = tl.dot(a_blk, tl.trans(xd), input_precision=PREC, out_dtype=ACC)
                if HAS_DZ:
                    dp = tl.dot(dz_blk, tl.trans(xd), input_precision=PREC, out_dtype=ACC)
            else:
                s = tl.zeros([BLOCK_M, BLOCK_N], ACC)
                dp = tl.zeros([BLOCK_M, BLOCK_N], ACC)
                for k in range(NUM_CC):
                    cols = k * BLOCK_C + c_ar
                    cm = m_mask[:, None] & (cols < C)[None, :]
                    xd_k = _load_xhat(x_base, n64, n_mask, k * BLOCK_C, C, sxn, sxc, mean, rstd,
                                      HAS_EPS, BLOCK_C, ACC).to(DOT)
                    a_k = tl.load(A_base + m_offs[:, None] * C + cols[None, :], mask=cm,
                                  other=0.0).to(DOT)
                    s = tl.dot(a_k, tl.trans(xd_k), acc=s, input_precision=PREC, out_dtype=ACC)
                    if HAS_DZ:
                        dz_k = tl.load(dZ_base + m_offs[:, None] * C + cols[None, :], mask=cm,
                                       other=0.0).to(DOT)
                        dp = tl.dot(dz_k, tl.trans(xd_k), acc=dp, input_precision=PREC, out_dtype=ACC)

            valid = m_mask[:, None] & n_mask[None, :]
            # Padding rows/tokens get P = 0 (exp(-inf)), hence dS = 0: they add nothing below.
            p = tl.exp(tl.where(valid, s + bias[:, None] - lse[:, None], float("-inf")))
            ds = tl.zeros([BLOCK_M, BLOCK_N], ACC)
            if HAS_DZ:
                ds = p * (dp - D_m[:, None])
            if HAS_GS:
                g = tl.load(gS_base + m_offs.to(tl.int64)[:, None] * sgm + n64[None, :] * sgn,
                            mask=valid, other=0.0)
                ds += g.to(ACC)
            dsd = ds.to(DOT)
            pd = p.to(DOT)

            if DA_IN_REGS:
                dc_acc += tl.sum(ds, 1)
            else:
                dc_old = tl.load(pdc_base + m_offs, mask=m_mask & not_first_tile, other=0.0)
                tl.store(pdc_base + m_offs, dc_old + tl.sum(ds, 1), mask=m_mask)

            if NUM_CC == 1:
                da = tl.dot(dsd, xd, input_precision=PREC, out_dtype=ACC)
                if DA_IN_REGS:
                    dA_acc += da
                else:
                    ap = pdA_base + m_offs[:, None] * C + c_ar[None, :]
                    da += tl.load(ap, mask=blk_mask & not_first_tile, other=0.0)
                    tl.store(ap, da, mask=blk_mask)
                dxh = tl.dot(tl.trans(dsd), a_blk, acc=dxh, input_precision=PREC, out_dtype=ACC)
                if HAS_DZ:
                    dxh = tl.dot(tl.trans(pd), dz_blk, acc=dxh, input_precision=PREC, out_dtype=ACC)
            else:
                for k in range(NUM_CC):
                    cols = k * BLOCK_C + c_ar
                    cmask = cols < C
                    cm = m_mask[:, None] & cmask[None, :]
                    xd_k = _load_xhat(x_base, n64, n_mask, k * BLOCK_C, C, sxn, sxc, mean, rstd,
                                      HAS_EPS, BLOCK_C, ACC).to(DOT)
                    ap = pdA_base + m_offs[:, None] * C + cols[None, :]
                    da = tl.load(ap, mask=cm & not_first_tile, other=0.0)
                    da = tl.dot(dsd, xd_k, acc=da, input_precision=PREC, out_dtype=ACC)
                    tl.store(ap, da, mask=cm)
                    a_k = tl.load(A_base + m_offs[:, None] * C + cols[None, :], mask=cm,
                                  other=0.0).to(DOT)
                    sp = scr_base + t_ar[:, None] * C + cols[None, :]
                    smask = (t_ar < BLOCK_N)[:, None] & cmask[None, :]
                    part = tl.load(sp, mask=smask & (mc > 0), other=0.0)
                    part = tl.dot(tl.trans(dsd), a_k, acc=part, input_precision=PREC, out_dtype=ACC)
                    if HAS_DZ:
                        dz_k = tl.load(dZ_base + m_offs[:, None] * C + cols[None, :], mask=cm,
                                       other=0.0).to(DOT)
                        part = tl.dot(tl.trans(pd), dz_k, acc=part, input_precision=PREC, out_dtype=ACC)
                    tl.store(sp, part, mask=smask)
            if not DA_IN_REGS:
                # Partials and scratch written above are re-read by other threads of this program.
                tl.debug_barrier()

        # LayerNorm backward (dx = dxhat without eps) and the store of dx.
        if NUM_CC == 1:
            cols = c_ar
            out_mask = n_mask[:, None] & (cols < C)[None, :]
            if HAS_EPS:
                mean1 = tl.sum(dxh, 1) / C
                mean2 = tl.sum(dxh * xt, 1) / C
                dxh = rstd[:, None] * (dxh - mean1[:, None] - xt * mean2[:, None])
            tl.store(dx_base + n64[:, None] * sdn + cols[None, :] * sdc,
                     dxh.to(dx_ptr.dtype.element_ty), mask=out_mask)
        else:
            mean1 = tl.zeros([BLOCK_N], ACC)
            mean2 = tl.zeros([BLOCK_N], ACC)
            if HAS_EPS:
                for k in range(NUM_CC):
                    cols = k * BLOCK_C + c_ar
                    smask = (t_ar < BLOCK_N)[:, None] & (cols < C)[None, :]
                    d = tl.load(scr_base + t_ar[:, None] * C + cols[None, :], mask=smask, other=0.0)
                    xk = _load_xhat(x_base, n64, n_mask, k * BLOCK_C, C, sxn, sxc, mean, rstd,
                                    HAS_EPS, BLOCK_C, ACC)
                    mean1 += tl.sum(d, 1)
                    mean2 += tl.sum(d * xk, 1)
                mean1 = mean1 / C
                mean2 = mean2 / C
            for k in range(NUM_CC):
                cols = k * BLOCK_C + c_ar
                smask = (t_ar < BLOCK_N)[:, None] & (cols < C)[None, :]
                d = tl.load(scr_base + t_ar[:, None] * C + cols[None, :], mask=smask, other=0.0)
                if HAS_EPS:
                    xk = _load_xhat(x_base, n64, n_mask, k * BLOCK_C, C, sxn, sxc, mean, rstd,
                                    HAS_EPS, BLOCK_C, ACC)
                    d = rstd[:, None] * (d - mean1[:, None] - xk * mean2[:, None])
                tl.store(dx_base + n64[:, None] * sdn + cols[None, :] * sdc,
                         d.to(dx_ptr.dtype.element_ty), mask=n_mask[:, None] & (cols < C)[None, :])
            # The next tile overwrites the scratch that was just read.
            tl.debug_barrier()

    if DA_IN_REGS:
        tl.store(pdA_base + m_ar[:, None] * C + c_ar[None, :], dA_acc, mask=blk_mask)
        tl.store(pdc_base + m_ar, dc_acc, mask=m_mask)


@triton.jit
def _reduce_splits_kernel(src_ptr, dst_ptr, L, n_splits, n_blocks,
                          BLOCK: tl.constexpr, ACC: tl.constexpr):
    """dst[b, i] = sum_s src[b, s, i], summed in the order s = 0, 1, ... (deterministic)."""
    pid = tl.program_id(0)
    blk = pid % n_blocks
    b = (pid // n_blocks).to(tl.int64)
    offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    acc = tl.zeros([BLOCK], ACC)
    for s in range(n_splits):
        acc += tl.load(src_ptr + (b * n_splits + s) * L + offs, mask=mask, other=0.0)
    tl.store(dst_ptr + b * L + offs, acc.to(dst_ptr.dtype.element_ty), mask=mask)


# Kernels decorated while TRITON_INTERPRET=1 run in the interpreter (CPU tensors only);
# otherwise they compile for the GPU (CUDA tensors only).
INTERPRETED = type(_fwd_kernel).__name__ == "InterpretedFunction"

# ---------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes of one launch (powers of two, >= 16 so every dot reduces over >= 16).

    split_len: tokens per program (rounded up to a multiple of block_n); 0 picks
    it from the shapes.  The result depends on the config only through the
    summation order, never on anything else.
    """

    block_m: int
    block_n: int
    block_c: int
    split_len: int = 0
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_c"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {v}")
        if self.split_len < 0:
            raise ValueError(f"KernelConfig.split_len must be >= 0, got {self.split_len}")


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(max(int(n), 1)))


# Interpreter: one program instance costs ~ms, so blocks are small enough that
# the usual test shapes exercise chunked rows/channels and several token ranges.
_INTERP_SPLIT_LEN = 256
# GPU: aim for this many programs, and cap the [B, splits, M, C] float32
# partial buffers (Z in the forward, dA in the backward), in elements.
_GPU_TARGET_PROGRAMS = 1024
_GPU_MAX_PARTIAL_ELEMS = 1 << 24


def _gpu_config(M: int, C: int, dtype: torch.dtype, backward: bool) -> KernelConfig:
    """A small hand-made table, no autotuning.  Chosen from sm_90 compiles of
    the kernels (no GPU timing yet): among the candidates, the largest tiles
    that compile without register spills (ptxas reports, see tools/triton_compile_report.py;
    tests/test_triton_compile.py checks every entry), with both Triton 3.6
    and 3.8, whose ptxas spill in different places.  One pipeline stage
    where two made ptxas spill; 32-token tiles in the backward, where 64
    spilled at 8 warps."""
    Mp, Cp = _pow2(M), _pow2(C)
    if dtype == torch.float64:  # 8-byte values: small tiles (Triton 3.6 spilled at 32-token backward tiles)
        return KernelConfig(16, 16, min(Cp, 32), 0, 4, 1) if backward else KernelConfig(16, 32, min(Cp, 32), 0, 4)
    half = dtype in (torch.float16, torch.bfloat16)
    if not backward:
        if half:
            if Cp <= 32:
                return KernelConfig(16, 64, Cp, 0, 4)
            if Cp <= 128:
                return KernelConfig(min(Mp, 32), 64, Cp, 0, 8)
            if Cp <= 256:
                return KernelConfig(16, 32, Cp, 0, 8, 1)
            if Mp >= 64:
                return KernelConfig(64, 32, 64, 0, 8)
            # 64-channel chunks spilled with Triton 3.6 (ptxas held it to 128 registers).
            return KernelConfig(16, 32, 128, 0, 8, 1)
        if Cp <= 32:
            return KernelConfig(16, 64, Cp, 0, 4, 1)
        if Cp <= 128:
            return KernelConfig(16, 32, Cp, 0, 8)
        return KernelConfig(64, 32, 32, 0, 8) if Mp >= 64 else KernelConfig(16, 32, 64, 0, 8)
    if half:
        if Cp <= 32:  # 8 warps spilled a few bytes at C = 16
            return KernelConfig(16, 32, Cp, 0, 4)
        if Cp <= 128:
            return KernelConfig(16, 32, Cp, 0, 8)
        if Cp <= 256:
            return KernelConfig(16, 32, 128, 0, 8, 1)
        if Mp > 64:  # rows in several chunks: 32-channel chunks spilled with Triton 3.6
            return KernelConfig(64, 64, 16, 0, 8)
        return KernelConfig(64, 64, 32, 0, 8) if Mp >= 64 else KernelConfig(16, 32, 64, 0, 8, 1)
    if Cp <= 32:
        if Mp > 16:  # rows in several chunks (dA in the partial buffer) spilled at 32 tokens
            return KernelConfig(16, 16, Cp, 0, 8, 1)
        if Cp <= 16:
            return KernelConfig(16, 32, Cp, 0, 8, 1)
        # C = 32: 32-token tiles spilled (Triton 3.6 at 8 warps, 3.6 and 3.8 at 4 or 2);
        # 16-token tiles take ~170 registers on 4 or 8 warps, so 4 (more programs per SM).
        return KernelConfig(16, 16, Cp, 0, 4, 1)
    if Cp <= 128:
        return KernelConfig(16, 32, 64, 0, 8, 1)
    return KernelConfig(16, 32, 32, 0, 8, 1)


def default_config(B: int, N: int, M: int, C: int, dtype: torch.dtype, backward: bool,
                   interpreted: Optional[bool] = None) -> KernelConfig:
    """The launch config used when none is given (a pure function of the shapes)."""
    if interpreted is None:
        interpreted = INTERPRETED
    if interpreted:
        return KernelConfig(16, 32, min(_pow2(C), 32), _INTERP_SPLIT_LEN, 1, 1)
    return _gpu_config(M, C, dtype, backward)


def _token_splits(B: int, N: int, M: int, C: int, cfg: KernelConfig,
                  row_programs: int) -> Tuple[int, int]:
    """(split_len, n_splits): token ranges per batch element, each a whole number of tiles."""
    tiles = triton.cdiv(N, cfg.block_n)
    if cfg.split_len:
        per = triton.cdiv(cfg.split_len, cfg.block_n)
    else:
        want = max(1, _GPU_TARGET_PROGRAMS // max(1, B * row_programs))
        want = min(want, max(1, _GPU_MAX_PARTIAL_ELEMS // max(1, B * M * C)))
        # At least 4 tiles per range so the partials stay cheap next to the work.
        want = max(1, min(want, tiles // 4))
        per = triton.cdiv(tiles, want)
    split_len = per * cfg.block_n
    return split_len, triton.cdiv(N, split_len)


# float32 dots: plain TF32 would cost ~1e-3 relative error.  "tf32x3" (three
# TF32 tensor-core products) keeps ~float32 accuracy and, compiled for sm_90,
# needs far fewer registers than "ieee" (FMA dots), which spill heavily there.
# "ieee" is the fallback should tf32x3 ever miss the 2e-4 target.
F32_DOT_PRECISION = "tf32x3"

_DOT_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


def _dtypes(dtype: torch.dtype):
    """(acc torch dtype, acc tl dtype, dot operand tl dtype, dot input precision)."""
    if dtype not in _DOT_DTYPES:
        raise TypeError(
            f"proxy_attention (triton backend): supports float32, float16, bfloat16 and float64, got {dtype}"
        )
    if dtype == torch.float64:
        return torch.float64, tl.float64, tl.float64, "ieee"
    # Half types: the precision argument is ignored (their own tensor-core dots).
    prec = F32_DOT_PRECISION if dtype == torch.float32 else "tf32"
    return torch.float32, tl.float32, _DOT_DTYPES[dtype], prec


def _check_device(x: Tensor) -> None:
    if INTERPRETED and x.device.type != "cpu":
        raise RuntimeError(
            "proxy_attention (triton backend): the kernels were defined under Triton's interpreter "
            f"(TRITON_INTERPRET=1) and take CPU tensors only, got {x.device} tensors"
        )
    if not INTERPRETED and x.device.type != "cuda":
        raise RuntimeError(
            "proxy_attention (triton backend): the kernels were compiled for the GPU and take CUDA "
            f"tensors; {x.device.type} tensors need TRITON_INTERPRET=1 set before icl_kernels is imported"
        )


def _on_device(x: Tensor):
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _eps_arg(eps: Optional[float]) -> float:
    return 0.0 if eps is None else float(eps)


# ---------------------------------------------------------------------------
# Entry points (the backend contract)
# ---------------------------------------------------------------------------


def proxy_attention_forward(
    x: Tensor, A: Tensor, c: Tensor, eps: Optional[float], *, config: Optional[KernelConfig] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """(Z [B, M, C], S [B, M, N]) in x's dtype and lse [B, M] in the accumulation dtype."""
    _check_device(x)
    acc_t, acc_tl, dot_tl, prec = _dtypes(x.dtype)
    B, N, C = x.shape
    M = A.shape[1]
    Z = torch.empty(B, M, C, device=x.device, dtype=x.dtype)
    S = torch.empty(B, M, N, device=x.device, dtype=x.dtype)
    lse = torch.empty(B, M, device=x.device, dtype=acc_t)
    if B == 0 or M == 0 or N == 0:
        return Z, S, lse
    A = A.contiguous()
    c = c.contiguous()
    cfg = config or default_config(B, N, M, C, x.dtype, backward=False)
    with _on_device(x):
        _launch_forward(x, A, c, eps, cfg, Z, S, lse, acc_t, acc_tl, dot_tl, prec)
    return Z, S, lse


def _launch_forward(x, A, c, eps, cfg, Z, S, lse, acc_t, acc_tl, dot_tl, prec) -> None:
    B, N, C = x.shape
    M = A.shape[1]
    n_mchunks = triton.cdiv(M, cfg.block_m)
    num_cc = triton.cdiv(C, cfg.block_c)
    split_len, n_splits = _token_splits(B, N, M, C, cfg, n_mchunks)
    pmax = torch.empty(B, n_splits, M, device=x.device, dtype=acc_t)
    psum = torch.empty_like(pmax)
    pz = torch.empty(B, n_splits, M, C, device=x.device, dtype=acc_t)
    _fwd_kernel[(B * n_splits * n_mchunks,)](
        x, A, c, S, pmax, psum, pz,
        N, M, C, split_len, n_splits, n_mchunks,
        x.stride(0), x.stride(1), x.stride(2), _eps_arg(eps),
        HAS_EPS=eps is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c,
        NUM_CC=num_cc, DOT=dot_tl, PREC=prec, ACC=acc_tl,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    bm2 = min(_pow2(M), 16)
    bc2 = min(_pow2(C), 128)
    n_mb, n_cb = triton.cdiv(M, bm2), triton.cdiv(C, bc2)
    _fwd_combine_kernel[(B * n_mb * n_cb,)](
        pmax, psum, pz, Z, lse, M, C, n_splits, n_mb, n_cb,
        BLOCK_M=bm2, BLOCK_C=bc2, ACC=acc_tl, num_warps=4,
    )


def _reduce_splits(part: Tensor, out: Tensor) -> None:
    B, n_splits = part.shape[:2]
    L = part[0, 0].numel()
    block = min(1024, triton.next_power_of_2(max(L, 1)))
    n_blocks = triton.cdiv(L, block)
    _reduce_splits_kernel[(B * n_blocks,)](
        part, out, L, n_splits, n_blocks, BLOCK=block, ACC=_DOT_DTYPES[part.dtype], num_warps=4
    )


def proxy_attention_backward(
    grad_Z: Optional[Tensor],
    grad_S: Optional[Tensor],
    x: Tensor,
    A: Tensor,
    c: Tensor,
    Z: Tensor,
    lse: Tensor,
    eps: Optional[float],
    *,
    config: Optional[KernelConfig] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx with x's layout, dA [B, M, C], dc [B, M]), all in x's dtype."""
    _check_device(x)
    acc_t, acc_tl, dot_tl, prec = _dtypes(x.dtype)
    B, N, C = x.shape
    M = A.shape[1]
    dx = torch.empty_like(x)
    dA = torch.empty(B, M, C, device=x.device, dtype=x.dtype)
    dc = torch.empty(B, M, device=x.device, dtype=x.dtype)
    if B == 0 or N == 0:
        return dx, dA, dc
    if M == 0 or (grad_Z is None and grad_S is None):
        return dx.zero_(), dA.zero_(), dc.zero_()
    A = A.contiguous()
    c = c.contiguous()
    lse = lse.to(acc_t).contiguous()
    if grad_Z is not None:
        dZ = grad_Z.contiguous()
        # D[m] = dZ[m] . Z[m]: the softmax backward's per-row constant (K-sized work).
        D = (dZ.to(acc_t) * Z.to(acc_t)).sum(-1).contiguous()
    else:
        dZ, D = A, lse  # placeholders, never read
    gS = grad_S if grad_S is not None else x  # placeholder, never read
    g_strides = grad_S.stride() if grad_S is not None else (0, 0, 0)

    cfg = config or default_config(B, N, M, C, x.dtype, backward=True)
    num_mc = triton.cdiv(M, cfg.block_m)
    num_cc = triton.cdiv(C, cfg.block_c)
    da_in_regs = num_mc == 1 and num_cc == 1
    split_len, n_splits = _token_splits(B, N, M, C, cfg, 1)
    pdA = torch.empty(B, n_splits, M, C, device=x.device, dtype=acc_t)
    pdc = torch.empty(B, n_splits, M, device=x.device, dtype=acc_t)
    if num_cc > 1:
        scratch = torch.empty(B * n_splits, cfg.block_n, C, device=x.device, dtype=acc_t)
    else:
        scratch = pdc  # placeholder, never read
    with _on_device(x):
        _bwd_kernel[(B * n_splits,)](
            x, A, c, lse, dZ, D, gS, dx, pdA, pdc, scratch,
            N, M, C, split_len, n_splits,
            x.stride(0), x.stride(1), x.stride(2), dx.stride(0), dx.stride(1), dx.stride(2),
            g_strides[0], g_strides[1], g_strides[2], _eps_arg(eps),
            HAS_EPS=eps is not None, HAS_DZ=grad_Z is not None, HAS_GS=grad_S is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c,
            NUM_MC=num_mc, NUM_CC=num_cc, DA_IN_REGS=da_in_regs,
            DOT=dot_tl, PREC=prec, ACC=acc_tl,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        _reduce_splits(pdA, dA)
        _reduce_splits(pdc, dc)
    return dx, dA, dc
