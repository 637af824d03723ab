"""icl_kernels: fused kernels for Inherent Consistent Learning (ICL).

- ``proxy_attention(x, A, c, eps=None, backend=None) -> (Z, S)``: the fused
  cross-attention of class queries over image tokens that also returns the logits.
- ``ProxyAttention``: a drop-in for the published ICL ``Query_Attention``.
- ``apply_to(model)``: swap the published modules of a model for ``ProxyAttention``.

Backends: ``triton``, ``cuda`` (GPU), ``cpu`` (C++), ``torch`` (reference);
``available_backends()`` says which can run here and why not.
"""
from . import _extension
from .backends import BackendUnavailableError, available_backends, backend_names
from .nn import ProxyAttention, apply_to
from .ops.proxy_attention import proxy_attention

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ProxyAttention",
    "apply_to",
    "available_backends",
    "backend_names",
    "proxy_attention",
]
