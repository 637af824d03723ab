"""icl_kernels: fused kernels for Inherent Consistent Learning (ICL).

- ``proxy_attention(x, A, c, eps=None, backend=None) -> (Z, S)``: the fused
  cross-attention of class queries over image tokens that also returns the logits.
- ``ProxyAttention``: a drop-in for the published ICL ``Query_Attention``.
- ``apply_to(model)``: swap the published modules of a model for ``ProxyAttention``.
- ``prototype_update_`` / ``masked_prototype_update_``: fused momentum update of
  class prototypes from class vectors or from a feature map and labels/probs.
- ``PrototypeMemory``: a module holding such prototypes.

Backends: ``triton``, ``cuda`` (GPU), ``cpu`` (C++), ``torch`` (reference);
``available_backends()`` says which can run here and why not.
"""
from . import _extension
from .backends import BackendUnavailableError, available_backends, backend_names
from .memory import PrototypeMemory
from .nn import ProxyAttention, apply_to
from .ops.prototype_update import masked_prototype_update_, prototype_update_
from .ops.proxy_attention import proxy_attention

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "PrototypeMemory",
    "ProxyAttention",
    "apply_to",
    "available_backends",
    "backend_names",
    "masked_prototype_update_",
    "prototype_update_",
    "proxy_attention",
]
