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
    lse = torch.logsumexp(S, dim=-1)
    P = torch.exp(S - lse.unsqueeze(-1))
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
