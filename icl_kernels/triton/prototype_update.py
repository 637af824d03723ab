"""Triton kernels of the prototype update (per-class sums and totals, and their backward).

Forward, one pass over the features: a program owns a (batch element, token
range) chunk and a block of channels; per tile of BLOCK_N tokens it builds the
class weights of the tile in registers ([BLOCK_K, BLOCK_N]: 0/1 from the labels,
times the token weight, or the probs themselves) and accumulates
``weights @ features_tile^T`` into a [BLOCK_K, BLOCK_C] accumulator with
``tl.dot``; nothing [B, K, N]-sized touches memory.

- deterministic: each program writes its partial [K, C] block and a second
  kernel adds the partials in program order (bitwise reproducible on one GPU).
- not deterministic: programs ``atomic_add`` their blocks into the output
  (saves the partial buffer, P * K * C words written and read again, and one
  launch; the float addition order then varies from run to run).

Precision: float32 features use ``input_precision="ieee"`` (the GPU default
tf32 would round the features to 10 mantissa bits); float16/bfloat16 features
go through the tensor cores in their own dtype with float32 accumulation,
which is exact for 0/1 label weights (per-token weights and probs are rounded
to the input dtype in that case); float64 stays float64.  The GPU needs every
dot dimension >= 16, so K and C are padded in registers.

Labels outside [0, K) that are not ignore_index are counted per program; the
host reads the count back (one sync) when check_labels is set or on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _class_sums_kernel(
    f_ptr, lab_ptr, w_ptr, p_ptr, out_ptr, tot_ptr, bad_ptr,
    N, C, K, ignore_index, chunk_len, chunks, cblocks,
    sfb, sfc, sfn, slb, sln, swb, swn, spb, spk, spn,
    USE_PROBS: tl.constexpr, HAS_W: tl.constexpr, ATOMIC: tl.constexpr, CHECK: tl.constexpr,
    LOW_PRECISION_DOT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    pkc = tl.program_id(1)                  # = class block * cblocks + channel block
    pc = pkc % cblocks
    kb = pkc // cblocks
    b = (pid // chunks).to(tl.int64)
    n_start = (pid % chunks) * chunk_len
    n_stop = tl.minimum(n_start + chunk_len, N)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    # 64-bit element offsets: C * N reaches 2^31 in one batch element of a large 3D volume.
    offs_c64 = offs_c.to(tl.int64)
    offs_k64 = offs_k.to(tl.int64)
    acc = tl.zeros([BLOCK_K, BLOCK_C], dtype=ACC)
    tot = tl.zeros([BLOCK_K], dtype=ACC)
    nbad = tl.zeros([BLOCK_N], dtype=tl.int32)
    for n0 in range(n_start, n_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_stop
        offs_n64 = offs_n.to(tl.int64)
        x = tl.load(f_ptr + b * sfb + offs_c64[:, None] * sfc + offs_n64[None, :] * sfn,
                    mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        if USE_PROBS:
            sel = tl.load(p_ptr + b * spb + offs_k64[:, None] * spk + offs_n64[None, :] * spn,
                          mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            tot += tl.sum(sel.to(ACC), axis=1)
        else:
            lab = tl.load(lab_ptr + b * slb + offs_n64 * sln, mask=mask_n, other=ignore_index).to(tl.int64)
            in_range = (lab >= 0) & (lab < K)
            kept = lab != ignore_index
            if CHECK:
                nbad += (kept & (~in_range) & mask_n).to(tl.int32)
            valid = in_range & kept & mask_n
            hit = (lab[None, :] == offs_k[:, None]) & valid[None, :]
            if HAS_W:
                w = tl.load(w_ptr + b * swb + offs_n64 * swn, mask=mask_n, other=0.0)
                valid = valid & (w != 0.0)
                hit = hit & (w[None, :] != 0.0)
                sel = tl.where(hit, w[None, :], tl.zeros([BLOCK_K, BLOCK_N], dtype=ACC))
            else:
                sel = hit.to(ACC)
            tot += tl.sum(sel, axis=1)
            # Skipped tokens add nothing, even where their features are not finite.
            x = tl.where(valid[None, :], x, tl.zeros_like(x))
        if LOW_PRECISION_DOT:
            acc = tl.dot(sel.to(x.dtype), tl.trans(x), acc, out_dtype=ACC)
        else:
            acc = tl.dot(sel.to(ACC), tl.trans(x.to(ACC)), acc, input_precision="ieee", out_dtype=ACC)
    out_offs = offs_k64[:, None] * C + offs_c[None, :]
    out_mask = mask_k[:, None] & mask_c[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptr + out_offs, acc, mask=out_mask)
        if pc == 0:
            tl.atomic_add(tot_ptr + offs_k, tot, mask=mask_k)
    else:
        base = pid.to(tl.int64) * K
        tl.store(out_ptr + base * C + out_offs, acc, mask=out_mask)
        if pc == 0:
            tl.store(tot_ptr + base + offs_k, tot, mask=mask_k)
    if CHECK:
        if pkc == 0:  # every class block sees the same labels: one of them reports
            tl.store(bad_ptr + pid, tl.sum(nbad, axis=0))


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, P, M, BLOCK: tl.constexpr):
    # out[j] = sum_p part[p, j], p in order: the deterministic combine.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for p in range(1, P):
        acc += tl.load(part_ptr + p * M + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc, mask=mask)


@triton.jit
def _labels_backward_kernel(
    g_ptr, gt_ptr, f_ptr, lab_ptr, w_ptr, gf_ptr, gw_ptr,
    N, C, K, ignore_index,
    sfb, sfc, sfn, slb, sln, swb, swn, sgb, sgc, sgn,
    HAS_W: tl.constexpr, NEED_F: tl.constexpr, NEED_W: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grad_features[b, :, n] = w * grad_sums[label]; grad_weights[b, n] = grad_sums[label] . features[b, :, n]
    # + grad_totals[label]; zero where the label does not count.
    b = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    lab = tl.load(lab_ptr + b * slb + offs_n64 * sln, mask=mask_n, other=ignore_index).to(tl.int64)
    valid = (lab >= 0) & (lab < K) & (lab != ignore_index) & mask_n
    k = tl.where(valid, lab, 0)
    if HAS_W:
        w = tl.load(w_ptr + b * swb + offs_n64 * swn, mask=mask_n, other=0.0)
    gw = tl.zeros([BLOCK_N], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        offs_c64 = offs_c.to(tl.int64)
        m2 = mask_c[:, None] & valid[None, :]
        g = tl.load(g_ptr + k[None, :] * C + offs_c[:, None], mask=m2, other=0.0)
        if NEED_F:
            val = g
            if HAS_W:
                val = g * w[None, :]
            tl.store(gf_ptr + b * sgb + offs_c64[:, None] * sgc + offs_n64[None, :] * sgn,
                     val.to(gf_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_n[None, :])
        if NEED_W:
            x = tl.load(f_ptr + b * sfb + offs_c64[:, None] * sfc + offs_n64[None, :] * sfn, mask=m2, other=0.0)
            gw += tl.sum(g * x.to(ACC), axis=0)
    if NEED_W:
        gtv = tl.load(gt_ptr + k, mask=valid, other=0.0)
        gw = tl.where(valid, gw + gtv, tl.zeros_like(gw))
        tl.store(gw_ptr + b * N + offs_n, gw, mask=mask_n)


@triton.jit
def _probs_backward_kernel(
    g_ptr, gt_ptr, f_ptr, p_ptr, gf_ptr, gp_ptr,
    N, C, K,
    sfb, sfc, sfn, spb, spk, spn, sgb, sgc, sgn, sqb, sqk, sqn,
    NEED_F: tl.constexpr, NEED_P: tl.constexpr, ACC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, NUM_KB: tl.constexpr,
):
    # grad_features[:, n] = sum_k probs[k, n] grad_sums[k]; grad_probs[k, n] = grad_sums[k] . features[:, n]
    # + grad_totals[k].  Both are products over the padded K or C axis; K is walked in NUM_KB blocks
    # of BLOCK_K classes so that the register tiles stay within budget at any class count.
    b = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    k_ar = tl.arange(0, BLOCK_K)
    if NUM_KB == 1:
        # All classes in one block: probs are read once and the two products share the loop over C.
        mask_k = k_ar < K
        p = tl.load(p_ptr + b * spb + k_ar.to(tl.int64)[:, None] * spk + offs_n64[None, :] * spn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(ACC)
        gp = tl.zeros([BLOCK_K, BLOCK_N], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            offs_c64 = offs_c.to(tl.int64)
            G = tl.load(g_ptr + k_ar[:, None] * C + offs_c[None, :], mask=mask_k[:, None] & mask_c[None, :],
                        other=0.0)
            if NEED_F:
                gf = tl.dot(tl.trans(G), p, input_precision="ieee", out_dtype=ACC)
                tl.store(gf_ptr + b * sgb + offs_c64[:, None] * sgc + offs_n64[None, :] * sgn,
                         gf.to(gf_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_n[None, :])
            if NEED_P:
                x = tl.load(f_ptr + b * sfb + offs_c64[:, None] * sfc + offs_n64[None, :] * sfn,
                            mask=mask_c[:, None] & mask_n[None, :], other=0.0).to(ACC)
                gp = tl.dot(G, x, gp, input_precision="ieee", out_dtype=ACC)
        if NEED_P:
            gt = tl.load(gt_ptr + k_ar, mask=mask_k, other=0.0)
            gp = gp + gt[:, None]
            tl.store(gp_ptr + b * sqb + k_ar.to(tl.int64)[:, None] * sqk + offs_n64[None, :] * sqn,
                     gp.to(gp_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])
    else:
        if NEED_F:
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mask_c = offs_c < C
                offs_c64 = offs_c.to(tl.int64)
                gf = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
                for kb in range(NUM_KB):
                    offs_k = kb * BLOCK_K + k_ar
                    mask_k = offs_k < K
                    G = tl.load(g_ptr + offs_k[:, None] * C + offs_c[None, :],
                                mask=mask_k[:, None] & mask_c[None, :], other=0.0)
                    p = tl.load(p_ptr + b * spb + offs_k.to(tl.int64)[:, None] * spk + offs_n64[None, :] * spn,
                                mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(ACC)
                    gf = tl.dot(tl.trans(G), p, gf, input_precision="ieee", out_dtype=ACC)
                tl.store(gf_ptr + b * sgb + offs_c64[:, None] * sgc + offs_n64[None, :] * sgn,
                         gf.to(gf_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_n[None, :])
        if NEED_P:
            for kb in range(NUM_KB):
                offs_k = kb * BLOCK_K + k_ar
                mask_k = offs_k < K
                gp = tl.zeros([BLOCK_K, BLOCK_N], dtype=ACC)
                for c0 in range(0, C, BLOCK_C):
                    offs_c = c0 + tl.arange(0, BLOCK_C)
                    mask_c = offs_c < C
                    G = tl.load(g_ptr + offs_k[:, None] * C + offs_c[None, :],
                                mask=mask_k[:, None] & mask_c[None, :], other=0.0)
                    x = tl.load(f_ptr + b * sfb + offs_c.to(tl.int64)[:, None] * sfc + offs_n64[None, :] * sfn,
                                mask=mask_c[:, None] & mask_n[None, :], other=0.0).to(ACC)
                    gp = tl.dot(G, x, gp, input_precision="ieee", out_dtype=ACC)
                gt = tl.load(gt_ptr + offs_k, mask=mask_k, other=0.0)
                gp = gp + gt[:, None]
                tl.store(gp_ptr + b * sqb + offs_k.to(tl.int64)[:, None] * sqk + offs_n64[None, :] * sqn,
                         gp.to(gp_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


# ---------------------------------------------------------------- host side


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@dataclass(frozen=True)
class Blocks:
    """Tile sizes of one prototype-update launch (powers of two >= 16: every dot dimension is >= 16)."""

    block_k: int
    block_c: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 1

    def num_kb(self, K: int) -> int:
        return triton.cdiv(max(int(K), 1), self.block_k)

    def __str__(self) -> str:
        return f"[k{self.block_k} c{self.block_c} n{self.block_n} w{self.num_warps} s{self.num_stages}]"


# Register and shared-memory budget (sm_90: 255 registers per thread, 227 KB of
# shared memory per block), from ptxas reports of every variant:
# - float32 "ieee" dots run on FMA units: each thread holds its share of the
#   accumulator plus its rows and columns of both operands along the reduced
#   axis, so the reduced axis stays short (16 tokens in the forward) and the
#   accumulator at <= 16 values per thread (BLOCK_K * BLOCK_C <= 2048 at 4 warps);
# - tensor-core dots (float16/bfloat16 inputs, float64 DMMA) hold [BK, BC] +
#   [BK, BN] + [BC, BN] tile words, kept at <= 48 words per thread;
# - software pipelining (num_stages >= 2) made ptxas spill the float64 and
#   float32 kernels for little gain in these memory-bound loops: one stage,
#   except the half-precision tensor-core forward.
# tools/triton_compile_report.py (and tests/test_triton_compile.py in CI) compiles every
# configuration these functions can return and checks spills and shared memory.
_TILE_WORDS_PER_THREAD = 48
_FMA_ACC_PER_THREAD = 16
_MAX_BLOCK_K = 64  # classes per program; more are split over programs (forward) or loops (backward)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def _words(dtype: torch.dtype) -> int:
    return 2 if dtype == torch.float64 else 1


def _forward_blocks(K: int, C: int, dtype: torch.dtype, use_probs: bool, has_weights: bool) -> Blocks:
    """Tiles of the class-sums kernel: accumulator [BK, BC], class weights [BK, BN], features [BC, BN]."""
    num_warps = 4
    threads = 32 * num_warps
    half = dtype in (torch.float16, torch.bfloat16)
    low = half and (use_probs or not has_weights)  # the kernel's LOW_PRECISION_DOT
    bk = min(_pow2(K), _MAX_BLOCK_K)
    bc = min(_pow2(C), 64)
    if dtype == torch.float32 or (half and not low):  # float32 FMA dot
        while bk * bc > _FMA_ACC_PER_THREAD * threads:
            if bc >= bk:
                bc //= 2
            else:
                bk //= 2
        return Blocks(bk, bc, 16, num_warps, 1)
    words = _words(dtype)
    for bn in (64, 32, 16):
        while (bk * bc + bk * bn + bc * bn) * words > _TILE_WORDS_PER_THREAD * threads and bc > 16:
            bc //= 2
        if (bk * bc + bk * bn + bc * bn) * words <= _TILE_WORDS_PER_THREAD * threads:
            return Blocks(bk, bc, bn, num_warps, 2 if half else 1)
        bc = min(_pow2(C), 64)
    return Blocks(min(bk, 32), 16, 16, num_warps, 1)


def _probs_backward_blocks(K: int, C: int, dtype: torch.dtype) -> Blocks:
    """Tiles of the probs backward: both products (over classes and over channels) are float32
    FMA dots or float64 DMMA; classes beyond BLOCK_K are looped over inside the program."""
    bk = min(_pow2(K), 32)
    # With several class blocks, the smaller token tiles made ptxas spill a few
    # bytes at 80-96 registers (float32: 32 tokens; float64 with Triton 3.6: 16);
    # the next size up compiled clean.
    if dtype == torch.float64:
        bn = 32 if K > bk else 16
    else:
        bn = 64 if K > bk else 32
    return Blocks(bk, min(_pow2(C), 32), bn, 4, 1)


def _labels_backward_blocks(dtype: torch.dtype) -> Blocks:
    """Tiles of the labels backward (no dot): gathered grad_sums and features [BC, BN]."""
    return Blocks(16, 32, 64, 4, 1) if dtype != torch.float64 else Blocks(16, 16, 64, 4, 1)


def _chunking(B: int, N: int, cblocks: int, block_n: int) -> Tuple[int, int]:
    """(chunks per batch element, tokens per chunk): a function of the shapes only,
    so the partials, and their sum, are the same from run to run."""
    tiles = triton.cdiv(N, block_n)
    target = 16 if _interpreting() else 1024  # programs; the interpreter runs them one by one
    chunks = max(1, min(tiles, triton.cdiv(target, B * cblocks)))
    chunk_len = triton.cdiv(tiles, chunks) * block_n
    return triton.cdiv(N, chunk_len), chunk_len


class _device_of:
    """Makes the tensors' GPU current while launching (a no-op on CPU)."""

    def __init__(self, t: Tensor):
        self.ctx = torch.cuda.device(t.device) if t.is_cuda else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _raise_bad_labels(labels: Tensor, num_classes: int, ignore_index: int) -> None:
    from ..reference import check_prototype_labels

    check_prototype_labels(labels, num_classes, ignore_index)  # raises with the offending value
    raise ValueError(f"prototype_update: labels must be in [0, {num_classes}) or equal ignore_index={ignore_index}")


def prototype_update_forward(
    features: Tensor,
    labels: Optional[Tensor],
    weights: Optional[Tensor],
    probs: Optional[Tensor],
    num_classes: int,
    ignore_index: int,
    check_labels: bool,
    deterministic: bool,
) -> Tuple[Tensor, Tensor]:
    B, C, N = features.shape
    use_probs = probs is not None
    K = probs.shape[1] if use_probs else int(num_classes)
    acc = _acc_dtype(features.dtype)
    if B == 0 or N == 0:
        return features.new_zeros(K, C, dtype=acc), features.new_zeros(K, dtype=acc)
    blk = _forward_blocks(K, C, features.dtype, use_probs, weights is not None)
    cblocks = triton.cdiv(C, blk.block_c)
    kblocks = blk.num_kb(K)
    chunks, chunk_len = _chunking(B, N, cblocks * kblocks, blk.block_n)
    P = B * chunks
    check = (not use_probs) and (check_labels or not features.is_cuda)
    atomic = not deterministic
    if atomic:
        out = features.new_zeros(K, C, dtype=acc)
        tot = features.new_zeros(K, dtype=acc)
    else:
        out = features.new_empty(P, K, C, dtype=acc)
        tot = features.new_empty(P, K, dtype=acc)
    bad = features.new_zeros(P, dtype=torch.int32)
    low = features.dtype in (torch.float16, torch.bfloat16) and (use_probs or weights is None)
    lab = labels if labels is not None else bad  # placeholders for unused pointers
    w = weights if weights is not None else out
    p = probs if use_probs else features
    with _device_of(features):
        _class_sums_kernel[(P, cblocks * kblocks)](
            features, lab, w, p, out, tot, bad,
            N, C, K, int(ignore_index), chunk_len, chunks, cblocks,
            features.stride(0), features.stride(1), features.stride(2),
            lab.stride(0) if labels is not None else 0, lab.stride(1) if labels is not None else 0,
            w.stride(0) if weights is not None else 0, w.stride(1) if weights is not None else 0,
            p.stride(0), p.stride(1), p.stride(2),
            USE_PROBS=use_probs, HAS_W=weights is not None, ATOMIC=atomic, CHECK=check,
            LOW_PRECISION_DOT=low, ACC=_tl_acc(features.dtype),
            BLOCK_K=blk.block_k, BLOCK_C=blk.block_c, BLOCK_N=blk.block_n, num_warps=blk.num_warps, num_stages=blk.num_stages,
        )
        if check and bool(bad.any()):  # one device-to-host sync on GPU
            _raise_bad_labels(labels, K, ignore_index)
        if atomic:
            return out, tot
        sums = features.new_empty(K, C, dtype=acc)
        totals = features.new_empty(K, dtype=acc)
        BLOCK = 256
        _sum_partials_kernel[(triton.cdiv(K * C, BLOCK),)](out, sums, P, K * C, BLOCK=BLOCK)
        _sum_partials_kernel[(triton.cdiv(K, BLOCK),)](tot, totals, P, K, BLOCK=BLOCK)
    return sums, totals


def prototype_update_backward(
    grad_sums: Tensor,
    grad_totals: Tensor,
    features: Tensor,
    labels: Optional[Tensor],
    weights: Optional[Tensor],
    probs: Optional[Tensor],
    ignore_index: int,
    need_features_grad: bool,
    need_aux_grad: bool,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    B, C, N = features.shape
    K = grad_sums.shape[0]
    acc = _acc_dtype(features.dtype)
    G = grad_sums.to(acc).contiguous()
    gt = grad_totals.to(acc).contiguous()
    gf = torch.empty_like(features) if need_features_grad else None
    if probs is not None:
        ga = torch.empty_like(probs) if need_aux_grad else None
    else:
        ga = torch.empty(B, N, dtype=acc, device=features.device) if need_aux_grad else None
    if B == 0 or N == 0 or not (need_features_grad or need_aux_grad):
        return gf, ga
    if probs is not None:
        blk = _probs_backward_blocks(K, C, features.dtype)
    else:
        blk = _labels_backward_blocks(features.dtype)
    block_n = blk.block_n
    gfp = gf if gf is not None else features  # placeholder pointer when unused
    gfs = (gf.stride(0), gf.stride(1), gf.stride(2)) if gf is not None else (0, 0, 0)
    grid = (triton.cdiv(N, block_n), B)
    with _device_of(features):
        if probs is not None:
            gap = ga if ga is not None else probs
            gas = (ga.stride(0), ga.stride(1), ga.stride(2)) if ga is not None else (0, 0, 0)
            _probs_backward_kernel[grid](
                G, gt, features, probs, gfp, gap, N, C, K,
                features.stride(0), features.stride(1), features.stride(2),
                probs.stride(0), probs.stride(1), probs.stride(2), *gfs, *gas,
                NEED_F=need_features_grad, NEED_P=need_aux_grad, ACC=_tl_acc(features.dtype),
                BLOCK_K=blk.block_k, BLOCK_C=blk.block_c, BLOCK_N=blk.block_n, NUM_KB=blk.num_kb(K),
                num_warps=blk.num_warps, num_stages=blk.num_stages,
            )
        else:
            w = weights if weights is not None else G
            gap = ga if ga is not None else G
            _labels_backward_kernel[grid](
                G, gt, features, labels, w, gfp, gap, N, C, K, int(ignore_index),
                features.stride(0), features.stride(1), features.stride(2),
                labels.stride(0), labels.stride(1),
                w.stride(0) if weights is not None else 0, w.stride(1) if weights is not None else 0, *gfs,
                HAS_W=weights is not None, NEED_F=need_features_grad, NEED_W=need_aux_grad,
                ACC=_tl_acc(features.dtype), BLOCK_C=blk.block_c, BLOCK_N=blk.block_n, num_warps=blk.num_warps,
                num_stages=blk.num_stages,
            )
    return gf, ga
