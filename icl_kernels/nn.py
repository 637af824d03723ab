"""Modules built on the fused ops: ``ProxyAttention`` and ``apply_to``.

``ProxyAttention`` computes what the published ICL ``Query_Attention`` computes
(same parameters, same outputs) but never projects the N tokens: the key
projection is folded into the K queries and the value projection is applied
after the attention (exact algebra, see docs/kernels.md, "The math of the fused attention"), and the remaining
N-sized work is one fused kernel.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from . import auto, backends
from .ops.proxy_attention import eager_path, resolve_backend, resolve_backend_for
from .ops.proxy_attention_block import (COMPILED_KERNEL_BACKENDS, block_node_available, head_mask,
                                       proxy_attention_block)

_warned_dropout_fallback = False


class ProxyAttention(nn.Module):
    """Cross-attention of K class queries over N tokens that also returns the logits.

    Args:
        dim: channel width C of queries and tokens.
        num_heads: heads H; ``dim`` must be divisible by it.
        qkv_bias: biases on ``fc_q`` and ``fc_kv``.
        qk_scale: logit scale; default ``(dim // num_heads) ** -0.5``. The
            attribute ``scale`` is read at every forward, as in the published code.
        attn_drop: dropout on the attention weights. In training mode with p > 0
            the module falls back to the explicit (unfused) computation.
        proj_drop: dropout after the output projection.
        official_layout: reproduce the published head split (a plain reshape
            of [B, K, C] to [B, H, K, C/H]); False uses the standard split.
        token_norm: own a LayerNorm ``norm_x`` applied to the tokens inside the
            fused op (LN(x) is never materialised). Same result as applying
            ``norm_x`` to x first.
        eps: the LayerNorm epsilon when ``token_norm``.
        backend: kernel backend (see ``icl_kernels.backends``); None follows
            ``ICL_KERNELS_BACKEND``, else auto. On CPU, ``auto`` runs the
            unfused formulation for shapes where it measured faster
            (:mod:`icl_kernels.auto`); a named backend always runs fused.

    Shapes: ``forward(q [B, K, dim], x [B, N, dim]) -> (out [B, K, dim],
    attn [B, K, H, N])`` where ``attn`` holds the scaled pre-softmax logits.

    Example:
        >>> import torch, icl_kernels
        >>> attn = icl_kernels.ProxyAttention(64, num_heads=4, token_norm=True)
        >>> out, logits = attn(torch.randn(2, 4, 64), torch.randn(2, 1024, 64))
        >>> out.shape, logits.shape
        (torch.Size([2, 4, 64]), torch.Size([2, 4, 4, 1024]))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        official_layout: bool = False,
        token_norm: bool = False,
        eps: float = 1e-5,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        _check_dims(dim, num_heads)
        self._set_config(dim, num_heads, qk_scale, official_layout, backend)
        self.fc_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.fc_kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if token_norm:
            if not eps > 0:
                raise ValueError(f"ProxyAttention: eps must be > 0, got {eps}")
            self.norm_x = nn.LayerNorm(dim, eps=eps)
        else:
            self.norm_x = None

    def _set_config(self, dim, num_heads, qk_scale, official_layout, backend) -> None:
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.official_layout = bool(official_layout)
        self.backend = backend

    @classmethod
    def from_linears(
        cls,
        fc_q: nn.Linear,
        fc_kv: nn.Linear,
        proj: nn.Linear,
        num_heads: int,
        scale: float,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        official_layout: bool = True,
        backend: Optional[str] = None,
    ) -> "ProxyAttention":
        """Build around existing Linear modules (shared, not copied)."""
        dim = fc_q.in_features
        if fc_q.out_features != dim or fc_kv.in_features != dim or fc_kv.out_features != 2 * dim:
            raise ValueError(
                "ProxyAttention.from_linears: expected fc_q dim->dim and fc_kv dim->2*dim, got "
                f"fc_q {fc_q.in_features}->{fc_q.out_features}, fc_kv {fc_kv.in_features}->{fc_kv.out_features}"
            )
        if proj.in_features != dim or proj.out_features != dim:
            raise ValueError(f"ProxyAttention.from_linears: proj must be {dim}->{dim}")
        _check_dims(dim, num_heads)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._set_config(dim, num_heads, None, official_layout, backend)
        self.scale = scale
        self.fc_q = fc_q
        self.fc_kv = fc_kv
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = proj
        self.proj_drop = nn.Dropout(proj_drop)
        self.norm_x = None
        return self

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, scale={self.scale:.4g}, "
            f"official_layout={self.official_layout}, backend={self.backend}"
        )

    # -- head layout -------------------------------------------------------
    # Both layouts view the projected queries as M = H*K rows of width d; they
    # differ only in which head each row meets.  Heads-major view [B, H, K, *].
    def _split(self, t: Tensor, B: int, K: int) -> Tensor:
        H = self.num_heads
        if self.official_layout:
            return t.reshape(B, H, K, -1)
        return t.reshape(B, K, H, -1).transpose(1, 2)

    def forward(self, q: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
        self._check_forward_inputs(q, x)
        mods = self._modules  # plain dict lookups: Module.__getattr__ costs ~1 us a call
        if self.training and mods["attn_drop"].p > 0:
            _warn_dropout_fallback()
            return self.forward_explicit(q, x)
        name = backends.requested_name(self.backend)
        if self._auto_unfused(x, x.shape[1], q.shape[1], name):
            return self.forward_explicit(q, x)
        Wq, bq = _weight_and_bias(mods["fc_q"])
        Wkv, bkv = _weight_and_bias(mods["fc_kv"])
        Wp, bp = _weight_and_bias(mods["proj"])
        norm = mods.get("norm_x")
        eps = gamma = beta = None
        if norm is not None:
            gamma, beta = _weight_and_bias(norm)
            eps = norm.eps
        tensors = (q, x, Wq, bq, Wkv, bkv, gamma, beta, Wp, bp)
        if torch.compiler.is_compiling():
            eager = False
            node_kernels = _traced_node_kernels(name, x.device, x.dtype, self.dim)  # C: a Python int even with dynamic shapes
        else:
            backend = resolve_backend(name, x)            # fails here, not in autograd, when a named backend cannot run
            node_kernels = _node_kernels(backend.name)
            eager = eager_path(q, x) if node_kernels is not None else eager_path(*tensors)
        if node_kernels is not None:  # the whole block as one C++ autograd node
            mask = head_mask(q.shape[1], self.num_heads, self.official_layout, q.device, Wq.dtype, cache=eager)
            out, attn = torch.ops.icl_kernels.proxy_attention_block.default(
                *tensors, mask, self.official_layout, self.scale, eps, node_kernels)
        else:  # no compiled extension: the same computation as a Python Function
            kern = backend.kernels("proxy_attention") if eager else name
            out, attn = proxy_attention_block(*tensors, self.num_heads, self.official_layout, self.scale, eps, kern)
        drop = mods["proj_drop"]
        if drop.p > 0:
            out = drop(out)
        return out, attn

    def _auto_unfused(self, x: Tensor, N: int, K: int, name: Optional[str] = None) -> bool:
        """`auto` on CPU: the unfused formulation where it measured faster
        (:func:`icl_kernels.auto.cpu_prefers_unfused`); never when a backend is named."""
        name = name if name is not None else backends.requested_name(self.backend)
        if x.device.type != "cpu" or name != backends.AUTO:
            return False
        return auto.cpu_prefers_unfused(N, self.dim, self.num_heads, self.num_heads * K)

    def _merge(self, O: Tensor, B: int, K: int) -> Tensor:
        """[B, H, K, d] -> [B, K, C] in the layout's order."""
        if self.official_layout:
            return O.reshape(B, K, self.dim)
        return O.transpose(1, 2).reshape(B, K, self.dim)

    def forward_explicit(self, q: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
        """The unfused computation (projects every token with BLAS); used for
        attention dropout, and by `auto` on CPU for shapes where it is faster."""
        self._check_forward_inputs(q, x)
        if self.norm_x is not None:
            x = self.norm_x(x)
        B, K, C = q.shape
        N = x.shape[1]
        H, d = self.num_heads, self.head_dim
        Q = self._split(self.fc_q(q), B, K)
        kv = self.fc_kv(x).view(B, N, 2, H, d).permute(2, 0, 3, 1, 4)
        logits = torch.matmul(Q, kv[0].transpose(-1, -2)) * self.scale   # [B, H, K, N]
        weights = self.attn_drop(logits.softmax(dim=-1))
        O = torch.matmul(weights, kv[1])
        out = self.proj_drop(self.proj(self._merge(O, B, K)))
        return out, logits.permute(0, 2, 1, 3)

    def _check_forward_inputs(self, q: Tensor, x: Tensor) -> None:
        if q.dim() != 3 or q.shape[-1] != self.dim:
            raise ValueError(f"ProxyAttention: q must be [B, K, {self.dim}], got shape {tuple(q.shape)}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"ProxyAttention: x must be [B, N, {self.dim}], got shape {tuple(x.shape)}")
        if q.shape[0] != x.shape[0]:
            raise ValueError(f"ProxyAttention: q has batch {q.shape[0]} but x has batch {x.shape[0]}")


def _node_kernels(backend: str) -> Optional[str]:
    """What the C++ block node is told to run for a resolved backend: "" (the
    compiled kernels of the tensors' device) for cpu / cuda, the backend's name
    for the others; None when the extension (so the node) is not there."""
    if not block_node_available():
        return None
    return "" if backend in COMPILED_KERNEL_BACKENDS else backend


def _traced_node_kernels(name: str, device: torch.device, dtype: torch.dtype, channels: int) -> Optional[str]:
    """:func:`_node_kernels` under torch.compile (evaluated once at trace time, as a constant)."""
    return _node_kernels(resolve_backend_for(name, device, dtype, channels).name)


# What torch.compiler.assume_constant_result does (it only sets this attribute),
# without importing torch._dynamo with icl_kernels (about 1 s); a test checks
# that the decorator still means this.
_traced_node_kernels._dynamo_marked_constant = True


def _weight_and_bias(module: nn.Module):
    """(weight, bias) of a Linear or LayerNorm (None where absent), read from its
    parameter dict when it is the plain class (a parametrized module computes
    them: ask it)."""
    if type(module) in (nn.Linear, nn.LayerNorm):
        params = module._parameters
        return params.get("weight"), params.get("bias")
    return getattr(module, "weight", None), getattr(module, "bias", None)


def _check_dims(dim: int, num_heads: int) -> None:
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"ProxyAttention: dim must be a positive int, got {dim!r}")
    if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
        raise ValueError(f"ProxyAttention: num_heads must be a positive divisor of dim={dim}, got {num_heads!r}")


def _warn_dropout_fallback() -> None:
    global _warned_dropout_fallback
    if not _warned_dropout_fallback:
        _warned_dropout_fallback = True
        warnings.warn(
            "ProxyAttention: attention dropout > 0 in training mode is not fused; "
            "using the explicit computation (slower, more memory)",
            stacklevel=3,
        )


def _dropout_p(module: nn.Module, name: str) -> float:
    sub = getattr(module, name, None)
    return float(sub.p) if isinstance(sub, nn.Dropout) else 0.0


def apply_to(model: nn.Module, match: Optional[Callable[[nn.Module], bool]] = None, backend: Optional[str] = None) -> int:
    """Replace attention modules of ``model`` in place by :class:`ProxyAttention`.

    Every submodule whose class is named ``Query_Attention`` (the published ICL
    module), or that ``match(module)`` accepts, becomes a
    ``ProxyAttention(official_layout=True)`` that holds the very same
    ``fc_q``, ``fc_kv`` and ``proj`` Linear modules (parameters keep their
    identity, so an optimizer built before the call keeps working), with the
    module's ``scale``, ``num_heads`` and dropout probabilities.

    Returns the number of modules replaced (0 on a second call).

    Example:
        >>> import torch, icl_kernels
        >>> from icl_kernels.published import Query_Attention
        >>> model = torch.nn.Sequential(Query_Attention(64, num_heads=4, qkv_bias=True))
        >>> icl_kernels.apply_to(model), icl_kernels.apply_to(model)
        (1, 0)
    """
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, ProxyAttention):
            continue
        if type(module).__name__ == "Query_Attention" or (match is not None and match(module)):
            targets.append((name, module))
    if any(name == "" for name, _ in targets):
        raise ValueError("apply_to: the model itself is an attention module; wrap it in a container first")
    for name, module in targets:
        for attr in ("fc_q", "fc_kv", "proj", "num_heads", "scale"):
            if not hasattr(module, attr):
                raise ValueError(f"apply_to: module {name!r} ({type(module).__name__}) has no attribute {attr!r}")
        new = ProxyAttention.from_linears(
            module.fc_q,
            module.fc_kv,
            module.proj,
            num_heads=int(module.num_heads),
            scale=float(module.scale),
            attn_drop=_dropout_p(module, "attn_drop"),
            proj_drop=_dropout_p(module, "proj_drop"),
            official_layout=True,
            backend=backend,
        )
        new.train(module.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return len(targets)
