"""The fused proxy attention op: custom-op registration, fake tensors, autograd
and backend dispatch.

``proxy_attention(x, A, c, eps=None)`` computes, per batch element, for M query
rows A[m] (bias c[m]) over N tokens x[n] of width C::

    xhat[n] = x[n]                        if eps is None
            = (x[n] - mean) / sqrt(var + eps)   (over C, no affine) otherwise
    S[m, n] = A[m] . xhat[n] + c[m]                      -> [B, M, N]
    Z[m]    = sum_n softmax_n(S[m, :]) xhat[n]           -> [B, M, C]

The kernels read x once and write S once; the backward recomputes the softmax
from a saved log-sum-exp (float32; float64 for float64 inputs) instead of
keeping a [B, M, N] probability map.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _extension, auto, backends

OP = "proxy_attention"


CUDA_MAX_CHANNELS = auto.CUDA_MAX_CHANNELS  # widest tokens the CUDA kernels take


def resolve_backend(name: str, x: Tensor) -> backends.Backend:
    """The backend that runs these tokens for the requested backend name (raises
    when a named backend cannot run)."""
    return resolve_backend_for(name, x.device, x.dtype, x.shape[-1])


def resolve_backend_for(name: str, device: torch.device, dtype: torch.dtype, channels: int) -> backends.Backend:
    """:func:`resolve_backend` for tokens of this device, dtype and width."""
    return backends.resolve(OP, name, device, auto.op_order(device.type, channels), dtype=dtype)


def resolve_kernels(name: str, x: Tensor):
    """(forward, backward) kernel functions of :func:`resolve_backend`'s backend."""
    return resolve_backend(name, x).kernels(OP)


def _like_x(x: Tensor, dx: Tensor) -> Tensor:
    """dx with x's memory layout (what the fake implementation promises)."""
    if x.is_contiguous() and dx.stride() == x.stride():  # contiguous: empty_like keeps x's strides
        return dx
    want = torch.empty_like(x)
    if want.stride() == dx.stride():
        return dx
    return want.copy_(dx)


# A call reaches its kernels in one of two ways, chosen once per call and kept
# for its backward ("kern"): eager calls on plain tensors pass the resolved
# (forward, backward) functions and run them directly; traced calls
# (torch.compile, fake tensors, subclasses, functorch) pass the backend *name*
# and go through the registered ops below, which tracing treats as opaque.


def run_forward(x: Tensor, A: Tensor, c: Tensor, eps: Optional[float], kern) -> Tuple[Tensor, Tensor, Tensor]:
    """(Z, S, lse) of the kernels ``kern`` (a resolved pair, or a backend name)."""
    if isinstance(kern, str):
        return torch.ops.icl_kernels.proxy_attention_forward.default(x, A, c, eps, kern)
    return kern[0](x, A, c, eps)


def run_backward(grad_Z, grad_S, x, A, c, Z, lse, eps, kern) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx in x's layout, dA, dc) of the kernels ``kern``."""
    if isinstance(kern, str):
        return torch.ops.icl_kernels.proxy_attention_backward.default(grad_Z, grad_S, x, A, c, Z, lse, eps, kern)
    dx, dA, dc = kern[1](grad_Z, grad_S, x, A, c, Z, lse, eps)
    return _like_x(x, dx), dA, dc


@torch.library.custom_op("icl_kernels::proxy_attention_forward", mutates_args=())
def _forward_op(x: Tensor, A: Tensor, c: Tensor, eps: Optional[float], backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return run_forward(x, A, c, eps, resolve_kernels(backend, x))


@_forward_op.register_fake
def _forward_fake(x, A, c, eps, backend):
    B, N, C = x.shape
    M = A.shape[1]
    return x.new_empty(B, M, C), x.new_empty(B, M, N), x.new_empty(B, M, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


@torch.library.custom_op("icl_kernels::proxy_attention_backward", mutates_args=())
def _backward_op(
    grad_Z: Optional[Tensor],
    grad_S: Optional[Tensor],
    x: Tensor,
    A: Tensor,
    c: Tensor,
    Z: Tensor,
    lse: Tensor,
    eps: Optional[float],
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    return run_backward(grad_Z, grad_S, x, A, c, Z, lse, eps, resolve_kernels(backend, x))


@_backward_op.register_fake
def _backward_fake(grad_Z, grad_S, x, A, c, Z, lse, eps, backend):
    return torch.empty_like(x), torch.empty_like(A), torch.empty_like(c)


# -- the autograd definition: one, used by the registered op and by the eager Function


def _setup_context(ctx, inputs, output):
    x, A, c, eps, kern = inputs
    Z, _, lse = output
    ctx.save_for_backward(x, A, c, Z, lse)
    ctx.eps = eps
    ctx.kern = kern
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_Z, grad_S, grad_lse):
    if grad_Z is None and grad_S is None:
        return None, None, None, None, None
    x, A, c, Z, lse = ctx.saved_tensors
    dx, dA, dc = run_backward(grad_Z, grad_S, x, A, c, Z, lse, ctx.eps, ctx.kern)
    if torch.is_grad_enabled() and not isinstance(ctx.kern, str):
        # create_graph=True: differentiating these gradients must fail loudly (the
        # registered path fails by itself: its backward op has no autograd formula)
        dx, dA, dc = _NoDoubleBackward.apply(x, A, c, dx, dA, dc)
    return dx, dA, dc, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerProxyAttention(torch.autograd.Function):
    """The registered op's autograd definition (:func:`_setup_context`,
    :func:`_backward`) over directly called kernels: eager calls on plain
    tensors skip the custom-op machinery (argument normalisation, redispatch
    through autograd and the backend key, alias checks), which costs more host
    time than a small kernel launch."""

    @staticmethod
    def forward(ctx, x, A, c, eps, kern):
        output = run_forward(x, A, c, eps, kern)
        _setup_context(ctx, (x, A, c, eps, kern), output)
        return output

    backward = staticmethod(_backward)


class _NoDoubleBackward(torch.autograd.Function):
    """Passes gradients through; differentiating them raises, as the registered
    op does (its backward has no autograd formula), instead of silently
    dropping this op's second-order terms."""

    @staticmethod
    def forward(ctx, x, A, c, *grads):
        return tuple(g.clone() for g in grads)

    @staticmethod
    def backward(ctx, *unused):
        raise RuntimeError("proxy_attention: no double backward (its gradients are not differentiable)")


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_path(*tensors: Optional[Tensor]) -> bool:
    """True for an eager call on plain (not fake, meta or subclass) tensors outside
    any functorch transform, where calling the kernels directly is exactly the op."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return all(t is None or (type(t) in _PLAIN and not t.is_meta) for t in tensors)


# Fake implementations of the raw compiled kernels, so they too can be traced
# (torch.compile, opcheck) when called directly.
if _extension.is_loaded():

    @torch.library.register_fake("icl_kernels::_proxy_attention_forward")
    def _raw_forward_fake(x, A, c, eps):
        return _forward_fake(x, A, c, eps, "")

    @torch.library.register_fake("icl_kernels::_proxy_attention_backward")
    def _raw_backward_fake(grad_Z, grad_S, x, A, c, Z, lse, eps):
        return _backward_fake(grad_Z, grad_S, x, A, c, Z, lse, eps, "")


def _check_inputs(x: Tensor, A: Tensor, c: Tensor, eps: Optional[float]) -> None:
    for name, t in (("x", x), ("A", A), ("c", c)):
        if not isinstance(t, Tensor):
            raise TypeError(f"proxy_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 3:
        raise ValueError(f"proxy_attention: x must be [B, N, C], got shape {tuple(x.shape)}")
    if A.dim() != 3:
        raise ValueError(f"proxy_attention: A must be [B, M, C], got shape {tuple(A.shape)}")
    if c.dim() != 2:
        raise ValueError(f"proxy_attention: c must be [B, M], got shape {tuple(c.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"proxy_attention: x must be a floating tensor, got {x.dtype}")
    for name, t in (("A", A), ("c", c)):
        if t.device != x.device:
            raise ValueError(
                f"proxy_attention: {name} is on {t.device} but x is on {x.device}; "
                "all tensors must be on one device"
            )
        if t.dtype != x.dtype:
            raise TypeError(f"proxy_attention: {name} has dtype {t.dtype} but x has {x.dtype}; they must match")
    B, N, C = x.shape
    if A.shape[0] != B:
        raise ValueError(f"proxy_attention: A has batch {A.shape[0]} but x has batch {B}")
    if A.shape[2] != C:
        raise ValueError(f"proxy_attention: A has width C={A.shape[2]} but x has C={C}")
    if tuple(c.shape) != (A.shape[0], A.shape[1]):
        raise ValueError(f"proxy_attention: c must be [B, M] = {[A.shape[0], A.shape[1]]}, got {list(c.shape)}")
    if N < 1:
        raise ValueError("proxy_attention: x must hold at least one token (N >= 1)")
    if C < 1:
        raise ValueError("proxy_attention: x must have at least one channel (C >= 1)")
    if eps is not None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise TypeError(f"proxy_attention: eps must be a float or None, got {type(eps).__name__}")
        if not (eps > 0 and eps != float("inf")):
            raise ValueError(f"proxy_attention: eps must be a finite number > 0 or None, got {eps}")


def proxy_attention(
    x: Tensor, A: Tensor, c: Tensor, *, eps: Optional[float] = None, backend: Optional[str] = None
) -> Tuple[Tensor, Tensor]:
    """Fused cross-attention of M query rows over N tokens; returns ``(Z, S)``.

    Args:
        x: tokens [B, N, C] (any strides: a [B, C, N] feature map viewed as
            [B, N, C] with ``.transpose(1, 2)`` needs no copy).
        A: query rows [B, M, C] (the key projection already folded in).
        c: row bias [B, M].
        eps: when given, each token is normalised over C (LayerNorm without
            affine) inside the kernel; fold the LayerNorm's weight and bias
            into A, c and the output.
        backend: ``auto`` | ``triton`` | ``cuda`` | ``cpu`` | ``torch``; default
            from ``ICL_KERNELS_BACKEND``, else ``auto``.

    Returns:
        Z [B, M, C] = softmax(S) @ xhat and S [B, M, N] = A @ xhat^T + c, both
        in x's dtype (accumulated in float32, float64 for float64 inputs).
        Differentiable with respect to x, A and c.

    Example:
        >>> import torch, icl_kernels
        >>> x, A, c = torch.randn(2, 100, 32), torch.randn(2, 8, 32), torch.zeros(2, 8)
        >>> Z, S = icl_kernels.proxy_attention(x, A, c, eps=1e-5)
        >>> Z.shape, S.shape
        (torch.Size([2, 8, 32]), torch.Size([2, 8, 100]))
    """
    _check_inputs(x, A, c, eps)
    name = backends.requested_name(backend)
    if eps is not None:
        eps = float(eps)
    if eager_path(x, A, c):
        # Also fails at the call site (not inside autograd) when a named backend cannot run.
        Z, S, _ = _EagerProxyAttention.apply(x, A, c, eps, resolve_kernels(name, x))
        return Z, S
    if not torch.compiler.is_compiling():
        resolve_kernels(name, x)
    Z, S, _ = torch.ops.icl_kernels.proxy_attention_forward(x, A, c, eps, name)
    return Z, S
