"""The whole attention block of :class:`icl_kernels.ProxyAttention` as one
autograd node: query projection, key projection folded into the queries, the
fused kernels, value and output projections, with a hand-written backward.

Forward, for queries q [B, K, C], tokens x [B, N, C], H heads of width d, M = H*K
query rows (row r meets head h(r): r // K in the published layout, r % H in
the standard one) and the token LayerNorm's affine (gamma, beta)::

    Q  = q Wq^T + bq                               [B, K, C] = M rows of width d
    A[r] = s * (Q[r] Wk_h(r)) * gamma              [B, M, C]   (key projection folded)
    c[r] = s * Q[r] . (bk_h(r) + Wk_h(r) beta)     [B, M]
    Z, S = proxy_attention(x, A, c, eps)           (the kernels; S are the logits)
    O[r] = Wv_h(r) (gamma * Z[r] + beta) + bv_h(r) [B, M, d] = [B, K, C]
    out  = O Wp^T + bp

The per-row head choice makes each product above one matrix product over all
rows whatever the layout (no per-head transposes): A is ``(Q expanded to its
head's block by a one-hot mask over heads) @ (s Wk * gamma)``, and O is each
row's own head block (a diagonal view) of ``Zt @ Wv^T``. That costs H times the
minimal flops of these K-sized products (at most a few percent of the kernels'
N-sized work when N >> C) and keeps the block at about 30 dispatched ops
forward and 50 backward, fewer than the published module's explicit
computation (see ``python -m benches.proxy_attention --overhead``).

The K-sized products run in the parameters' dtype with autocast off (the
folded query rows are sums of C products and lose most of their digits in
bfloat16); the kernels run in x's dtype.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from .. import _extension
from .proxy_attention import run_backward, run_forward

_MASKS: Dict[tuple, Tensor] = {}


def head_mask(K: int, H: int, official: bool, device: torch.device, dtype: torch.dtype, cache: bool) -> Tensor:
    """[M, H, 1] with 1 where row r meets head h: r // K == h (published layout)
    or r % H == h (standard layout). Cached for eager calls."""
    key = (K, H, official, device, dtype)
    mask = _MASKS.get(key) if cache else None
    if mask is None:
        rows = torch.arange(H * K, device=device)
        head = rows // K if official else rows % H
        mask = (head.unsqueeze(1) == torch.arange(H, device=device)).to(dtype).unsqueeze(-1)
        if cache and type(mask) is torch.Tensor:  # never keep a fake or traced tensor
            _MASKS[key] = mask
    return mask


def _autocast_on(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type) if device_type in ("cuda", "cpu") else False


def _addmm(bias: Optional[Tensor], a: Tensor, b: Tensor) -> Tensor:
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


def own_head(Y: Tensor, B: int, K: int, H: int, official: bool) -> Tensor:
    """Y [B*M, C] holds every head's d-wide block for each row; -> [B*K, C]: each
    row's own head's block (rows in order, i.e. [B, M, d] viewed as [B*K, C]).
    A diagonal view and one copy."""
    C = Y.shape[1]
    d = C // H
    if official:  # row r = h*K + k meets head h
        return Y.view(B, H, K, H, d).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(B * K, C)
    return Y.view(B, K, H, H, d).diagonal(dim1=2, dim2=3).permute(0, 1, 3, 2).reshape(B * K, C)  # r = k*H + h


# -- the four K-sized pieces around the kernels. Each has a C++ twin in
# csrc/proxy_attention_block.cpp (same ops in the same order, so the same bits;
# tested), which runs when the extension is loaded: from C++ an ATen call costs
# about half the host time of the same call from Python.


def fold(q, Wq, bq, Wkv, bkv, gamma, beta, mask, scale: float, x_dtype: torch.dtype):
    """-> (q2 [B*K, C], Qe [B*M, C], Wk_f [C, C], v [C], A [B, M, C], c [B, M]):
    the query rows expanded to their head's block (Qe), the folded key weights
    Wk_f = s Wk * gamma and bias v = s (bk + Wk beta), A = Qe Wk_f and c = Qe v
    (A, c in x's dtype)."""
    B, K, C = q.shape
    M, H = mask.shape[0], mask.shape[1]
    dt = Wq.dtype
    q2 = q.reshape(B * K, C).to(dt)
    Wk = Wkv[:C]
    bk = None if bkv is None else bkv[:C]
    Qe = (_addmm(bq, q2, Wq.t()).view(B, M, 1, C // H) * mask).view(B * M, C)
    Wk_f = Wk * scale if gamma is None else Wk * (gamma * scale)
    if beta is None:
        v = Wk.new_zeros(C) if bk is None else bk * scale
    else:
        v = torch.mv(Wk, beta).mul_(scale) if bk is None else torch.addmv(bk, Wk, beta, beta=scale, alpha=scale)
    A = torch.mm(Qe, Wk_f).view(B, M, C).to(x_dtype)
    c = torch.mv(Qe, v).view(B, M).to(x_dtype)
    return q2, Qe, Wk_f, v, A, c


def unfold(Z, Wkv, bkv, gamma, beta, Wp, bp, mask, official: bool):
    """-> (Zc [B*M, C], Zt = gamma * Zc + beta, O [B*K, C], out [B, K, C]): each
    row's head block of the value projection of Zt, then the output projection."""
    B, M, C = Z.shape
    H = mask.shape[1]
    K = M // H
    Zc = Z.reshape(B * M, C).to(Wkv.dtype)
    if gamma is None:
        Zt = Zc if beta is None else Zc + beta
    else:
        Zt = Zc * gamma if beta is None else torch.addcmul(beta, Zc, gamma)
    bv = None if bkv is None else bkv[C:]
    O = own_head(_addmm(bv, Zt, Wkv[C:].t()), B, K, H, official)
    out = _addmm(bp, O, Wp.t()).view(B, K, C)
    return Zc, Zt, O, out


def unfold_backward(d_out, Zc, Zt, O, Wkv, gamma, Wp, mask, x_dtype: torch.dtype):
    """-> (dZ [B, M, C] in x's dtype, dWp, dbp, dWv, dbv, dgamma, dbeta) of
    :func:`unfold`; dgamma is empty when there is no gamma."""
    BK, C = O.shape
    BM, B = Zc.shape[0], d_out.shape[0]
    M, H = mask.shape[0], mask.shape[1]
    g = d_out.reshape(BK, C).to(Wkv.dtype)
    dWp = torch.mm(g.t(), O)
    dbp = g.sum(0)
    dY = (torch.mm(g, Wp).view(B, M, 1, C // H) * mask).view(BM, C)
    dZt = torch.mm(dY, Wkv[C:])
    dWv = torch.mm(dY.t(), Zt)
    dbv = dY.sum(0)
    dbeta = dZt.sum(0)
    if gamma is None:
        dgamma = Zc.new_empty(0)
        dZ = dZt
    else:
        dgamma = (dZt * Zc).sum(0)
        dZ = dZt * gamma
    return dZ.view(B, M, C).to(x_dtype), dWp, dbp, dWv, dbv, dgamma, dbeta


def fold_backward(dA, dc, q2, Qe, Wq, Wkv, Wk_f, v, gamma, beta, mask, official: bool, scale: float,
                  dWv, dbv, dgamma, dbeta):
    """-> (dq [B, K, C], dWq, dbq, dWkv, dbkv, dgamma, dbeta) of :func:`fold`,
    adding the gradients :func:`unfold_backward` gave (None: zero); dgamma /
    dbeta are empty where there is no gamma / beta."""
    B, M, C = dA.shape
    H = mask.shape[1]
    dt = Wq.dtype
    dA = dA.reshape(B * M, C).to(dt)
    dc = dc.reshape(B * M).to(dt)
    Wk = Wkv[:C]
    dWk_f = torch.mm(Qe.t(), dA)
    dv = torch.mv(Qe.t(), dc)
    if gamma is None:
        dgamma = Wk.new_empty(0)
        dWk = dWk_f * scale
    else:
        dsg = (dWk_f * Wk).sum(0)
        dgamma = dsg.mul_(scale) if dgamma is None else dgamma.add(dsg, alpha=scale)
        dWk = dWk_f * (gamma * scale)
    if beta is None:
        dbeta = Wk.new_empty(0)
    else:
        dWk.addr_(dv, beta, alpha=scale)
        dbeta = torch.mv(Wk.t(), dv).mul_(scale) if dbeta is None else torch.addmv(dbeta, Wk.t(), dv, alpha=scale)
    dQe = torch.mm(dA, Wk_f.t()).addr_(dc, v)
    dQ = own_head(dQe, B, M // H, H, official)
    dWq = torch.mm(dQ.t(), q2)
    dbq = dQ.sum(0)
    dq = torch.mm(dQ, Wq).view(B, M // H, C)
    dWkv = torch.cat([dWk, torch.zeros_like(dWk) if dWv is None else dWv])
    dbk = dv * scale
    dbkv = torch.cat([dbk, torch.zeros_like(dbk) if dbv is None else dbv])
    return dq, dWq, dbq, dWkv, dbkv, dgamma, dbeta


def _pieces():
    """The C++ pieces when the extension provides them, else the Python ones above."""
    if _extension.has_kernel("_proxy_block_fold", "CompositeImplicitAutograd"):
        ops = torch.ops.icl_kernels
        return (ops._proxy_block_fold.default, ops._proxy_block_unfold.default,
                ops._proxy_block_unfold_backward.default, ops._proxy_block_fold_backward.default)
    return fold, unfold, unfold_backward, fold_backward


_FOLD, _UNFOLD, _UNFOLD_BACKWARD, _FOLD_BACKWARD = _pieces()

# Backends whose raw compiled kernels the C++ autograd node
# ``icl_kernels::proxy_attention_block`` calls directly through the dispatcher; for
# the others it calls the registered op proxy_attention_forward / _backward.
COMPILED_KERNEL_BACKENDS = ("cpu", "cuda")


def block_node_available() -> bool:
    return _extension.has_kernel("proxy_attention_block", "Autograd")


class ProxyAttentionBlock(torch.autograd.Function):
    """``apply(q, x, Wq, bq, Wkv, bkv, gamma, beta, Wp, bp, heads, official, scale, eps, kern)``
    -> (out [B, K, C], attn [B, K, H, N]). bq, bkv, gamma, beta, bp may be None;
    eps None means no token LayerNorm; ``kern`` as in :func:`run_forward`."""

    @staticmethod
    def forward(ctx, q, x, Wq, bq, Wkv, bkv, gamma, beta, Wp, bp, heads, official, scale, eps, kern):
        B, K, _ = q.shape
        N = x.shape[1]
        mask = head_mask(K, heads, official, q.device, Wq.dtype, cache=not isinstance(kern, str))
        q2, Qe, Wk_f, v, A, c = _FOLD(q, Wq, bq, Wkv, bkv, gamma, beta, mask, scale, x.dtype)
        Z, S, lse = run_forward(x, A, c, eps, kern)
        Zc, Zt, O, out = _UNFOLD(Z, Wkv, bkv, gamma, beta, Wp, bp, mask, official)
        ctx.save_for_backward(q2, x, Wq, Wkv, Wp, gamma, beta, mask, Qe, Wk_f, v, A, c, Z, lse, Zc, Zt, O)
        ctx.scale, ctx.eps, ctx.kern, ctx.official, ctx.device_type = scale, eps, kern, official, x.device.type
        ctx.has_bias = (bq is not None, bkv is not None, bp is not None)
        ctx.set_materialize_grads(False)
        attn = S.view(B, heads, K, N).permute(0, 2, 1, 3) if official else S.view(B, K, heads, N)
        return out, attn

    @staticmethod
    def backward(ctx, d_out, d_attn):
        if d_out is None and d_attn is None:
            return (None,) * 15
        saved = ctx.saved_tensors  # unpacked once: each access rebuilds every tensor
        if _autocast_on(ctx.device_type):
            with torch.autocast(ctx.device_type, enabled=False):
                return _block_backward(ctx, saved, d_out, d_attn)
        return _block_backward(ctx, saved, d_out, d_attn)


def _block_backward(ctx, saved, d_out, d_attn):
    q2, x, Wq, Wkv, Wp, gamma, beta, mask, Qe, Wk_f, v, A, c, Z, lse, Zc, Zt, O = saved
    has_bq, has_bkv, has_bp = ctx.has_bias
    dZ = dWp = dbp = dWv = dbv = dgamma = dbeta = None
    if d_out is not None:
        dZ, dWp, dbp, dWv, dbv, dgamma, dbeta = _UNFOLD_BACKWARD(d_out, Zc, Zt, O, Wkv, gamma, Wp, mask, x.dtype)
        if gamma is None:
            dgamma = None
    dS = None
    if d_attn is not None:
        B, M, N = A.shape[0], A.shape[1], x.shape[1]
        dS = (d_attn.permute(0, 2, 1, 3) if ctx.official else d_attn).reshape(B, M, N)
        if dS.dtype != x.dtype:
            dS = dS.to(x.dtype)
    dx, dA, dc = run_backward(dZ, dS, x, A, c, Z, lse, ctx.eps, ctx.kern)
    dq, dWq, dbq, dWkv, dbkv, dgamma, dbeta = _FOLD_BACKWARD(
        dA, dc, q2, Qe, Wq, Wkv, Wk_f, v, gamma, beta, mask, ctx.official, ctx.scale, dWv, dbv, dgamma, dbeta)
    return (dq, dx, dWq, dbq if has_bq else None, dWkv, dbkv if has_bkv else None,
            dgamma if gamma is not None else None, dbeta if beta is not None else None,
            dWp, dbp if has_bp else None, None, None, None, None, None)


def proxy_attention_block(q, x, Wq, bq, Wkv, bkv, gamma, beta, Wp, bp, heads, official, scale, eps, kern):
    """Runs :class:`ProxyAttentionBlock` with autocast off (the K-sized products
    in the parameters' dtype, the kernels in x's)."""
    if _autocast_on(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return ProxyAttentionBlock.apply(q, x, Wq, bq, Wkv, bkv, gamma, beta, Wp, bp, heads, official, scale, eps,
                                             kern)
    return ProxyAttentionBlock.apply(q, x, Wq, bq, Wkv, bkv, gamma, beta, Wp, bp, heads, official, scale, eps, kern)
