"""Plain PyTorch implementations: the ``torch`` backend and the tests' oracle.

Every function works on any device and floating dtype; half precision inputs
are computed in float32.  ``proxy_attention_math`` is differentiable by
autograd and is what the tests compare every backend against (in float64);
``proxy_attention_forward`` / ``proxy_attention_backward`` are the backend
entry points with the same contract as the fused kernels (the backward uses
the closed-form gradient, like the kernels, and recomputes the softmax from
the saved log-sum-exp).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_tokens(x: Tensor, eps: Optional[float]) -> Tuple[Tensor, Optional[Tensor]]:
    """Returns (xhat, rstd): x normalised over its last dim without affine, in the
    accumulation dtype; rstd is None when eps is None (xhat = x)."""
    xa = x.to(accumulation_dtype(x.dtype))
    if eps is None:
        return xa, None
    mean = xa.mean(dim=-1, keepdim=True)
    centered = xa - mean
    var = (centered * centered).mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return centered * rstd, rstd


def proxy_attention_math(x: Tensor, A: Tensor, c: Tensor, eps: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """Differentiable composite form: (Z, S) in the accumulation dtype."""
    xhat, _ = normalize_tokens(x, eps)
    acc = xhat.dtype
    S = torch.matmul(A.to(acc), xhat.transpose(-1, -2)) + c.to(acc).unsqueeze(-1)
    P = torch.softmax(S, dim=-1)
    Z = torch.matmul(P, xhat)
    return Z, S


def proxy_attention_forward(x: Tensor, A: Tensor, c: Tensor, eps: Optional[float]) -> Tuple[Tensor, Tensor, Tensor]:
    xhat, _ = normalize_tokens(x, eps)
    acc = xhat.dtype
    S = torch.baddbmm(c.to(acc).unsqueeze(-1), A.to(acc), xhat.transpose(1, 2))
    if S.shape[-1] == 0:
        lse = torch.logsumexp(S, dim=-1)
        P = S
    else:  # P from the row max (an entry of S, exact) and the row sum: exp(S - lse) would carry
        # lse's rounding (half an ulp of |lse|, 1e-3 at logits ~1.8e4 in float32) into every P
        m = S.amax(dim=-1, keepdim=True)
        E = torch.exp(S - m)
        l = E.sum(dim=-1, keepdim=True)
        P = E / l
        lse = (m + torch.log(l)).squeeze(-1)
    Z = torch.bmm(P, xhat)
    return Z.to(x.dtype), S.to(x.dtype), lse


def proxy_attention_backward(
    grad_Z: Optional[Tensor],
    grad_S: Optional[Tensor],
    x: Tensor,
    A: Tensor,
    c: Tensor,
    Z: Tensor,
    lse: Tensor,
    eps: Optional[float],
) -> Tuple[Tensor, Tensor, Tensor]:
    xhat, rstd = normalize_tokens(x, eps)
    acc = xhat.dtype
    Aa = A.to(acc)
    S = torch.baddbmm(c.to(acc).unsqueeze(-1), Aa, xhat.transpose(1, 2))
    P = torch.exp(S - lse.to(acc).unsqueeze(-1))
    # renormalise: the saved lse is rounded to the accumulation dtype, which scales a row of P by
    # exp(-rounding) (a relative error of ulp(|lse|) / 2, not negligible at large logits)
    P = P / P.sum(dim=-1, keepdim=True)
    if grad_Z is not None:
        dZ = grad_Z.to(acc)
        dP = torch.bmm(dZ, xhat.transpose(1, 2))
        D = (dZ * Z.to(acc)).sum(dim=-1, keepdim=True)
        dS = P * (dP - D)
    else:
        dZ = None
        dS = torch.zeros_like(S)
    if grad_S is not None:
        dS = dS + grad_S.to(acc)
    dA = torch.bmm(dS, xhat)
    dc = dS.sum(dim=-1)
    dxhat = torch.bmm(dS.transpose(1, 2), Aa)
    if dZ is not None:
        dxhat = dxhat + torch.bmm(P.transpose(1, 2), dZ)
    if rstd is not None:
        mean1 = dxhat.mean(dim=-1, keepdim=True)
        mean2 = (dxhat * xhat).mean(dim=-1, keepdim=True)
        dx = rstd * (dxhat - mean1 - xhat * mean2)
    else:
        dx = dxhat
    return dx.to(x.dtype), dA.to(x.dtype), dc.to(x.dtype)


# ---------------------------------------------------------------- prototype update
#
# Per-class sums [K, C] and totals [K] over features [B, C, N], either by
# integer labels [B, N] (optionally weighted, [B, N]) or by soft weights
# probs [B, K, N].  A label counts when 0 <= label < K and label != ignore_index;
# with weights, a token of weight 0 adds nothing (even where its features are
# not finite).  This is the `torch` backend: plain ops, a one-hot matrix
# product (deterministic on every device, and memory hungry: [B, K, N]).


def prototype_class_ids(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """int64 [B, N]: the label where it counts, else -1."""
    lab = labels.long()
    valid = (lab != ignore_index) & (lab >= 0) & (lab < num_classes)
    return torch.where(valid, lab, torch.full_like(lab, -1))


def check_prototype_labels(labels: Tensor, num_classes: int, ignore_index: int) -> None:
    """ValueError naming the first label outside [0, K) that is not ignore_index (syncs on GPU)."""
    lab = labels.long()
    bad = (lab != ignore_index) & ((lab < 0) | (lab >= num_classes))
    if bool(bad.any()):
        first = int(lab[bad].flatten()[0])
        raise ValueError(
            f"prototype_update: labels must be in [0, {num_classes}) or equal ignore_index="
            f"{ignore_index}; found the label {first}"
        )


def prototype_update_math(
    features: Tensor,
    labels: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
    probs: Optional[Tensor] = None,
    num_classes: Optional[int] = None,
    ignore_index: int = -100,
) -> Tuple[Tensor, Tensor]:
    """Differentiable composite form (the tests' oracle): (sums [K, C], totals [K])
    in the accumulation dtype, written as the naive one-hot product."""
    acc = accumulation_dtype(features.dtype)
    f = features.to(acc)
    if probs is not None:
        p = probs.to(acc)
        return torch.einsum("bkn,bcn->kc", p, f), p.sum(dim=(0, 2))
    K = int(num_classes)
    cls = prototype_class_ids(labels, K, ignore_index)
    onehot = (cls.unsqueeze(1) == torch.arange(K, device=cls.device).view(1, K, 1)).to(acc)
    if weights is not None:
        onehot = onehot * weights.to(acc).unsqueeze(1)
    return torch.einsum("bkn,bcn->kc", onehot, f), onehot.sum(dim=(0, 2))


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
    acc = accumulation_dtype(features.dtype)
    f = features.to(acc)
    if probs is not None:
        p = probs.to(acc)
        sums = torch.bmm(p, f.transpose(1, 2)).sum(dim=0) if f.shape[0] > 0 else f.new_zeros(p.shape[1], f.shape[1])
        return sums, p.sum(dim=(0, 2))
    K = int(num_classes)
    if check_labels or labels.device.type == "cpu":
        check_prototype_labels(labels, K, ignore_index)
    cls = prototype_class_ids(labels, K, ignore_index)
    w = weights.to(acc) if weights is not None else None
    if w is not None:
        cls = torch.where(w != 0, cls, torch.full_like(cls, -1))
    counts = cls >= 0
    # Skipped tokens are zeroed with a select, not a product, so non-finite features there add nothing.
    fm = torch.where(counts.unsqueeze(1), f if w is None else f * w.unsqueeze(1), torch.zeros((), dtype=acc, device=f.device))
    onehot = (cls.unsqueeze(1) == torch.arange(K, device=cls.device).view(1, K, 1)).to(acc)
    sums = torch.einsum("bkn,bcn->kc", onehot, fm)
    totals = (onehot * w.unsqueeze(1)).sum(dim=(0, 2)) if w is not None else onehot.sum(dim=(0, 2))
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
    acc = accumulation_dtype(features.dtype)
    G = grad_sums.to(acc)
    gt = grad_totals.to(acc)
    f = features.to(acc)
    gf = ga = None
    if probs is not None:
        p = probs.to(acc)
        if need_features_grad:
            gf = torch.einsum("bkn,kc->bcn", p, G).to(features.dtype)
        if need_aux_grad:
            ga = (torch.einsum("kc,bcn->bkn", G, f) + gt.view(1, -1, 1)).to(probs.dtype)
        return gf, ga
    K = G.shape[0]
    cls = prototype_class_ids(labels, K, ignore_index)
    # Row K of the padded tables is zero: tokens that do not count get no gradient.
    idx = torch.where(cls >= 0, cls, torch.full_like(cls, K))
    Gp = torch.cat([G, G.new_zeros(1, G.shape[1])], dim=0)
    gtp = torch.cat([gt, gt.new_zeros(1)], dim=0)
    g = Gp[idx].transpose(1, 2)  # [B, C, N]
    if need_features_grad:
        scaled = g if weights is None else g * weights.to(acc).unsqueeze(1)
        gf = scaled.to(features.dtype)
    if need_aux_grad:
        dots = torch.where(cls.unsqueeze(1) >= 0, g * f, torch.zeros((), dtype=acc, device=f.device)).sum(dim=1)
        ga = (dots + gtp[idx]).to(weights.dtype)
    return gf, ga
