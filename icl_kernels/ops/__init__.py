"""Custom ops (torch.library namespace ``icl_kernels``), one file per op."""
from .prototype_update import masked_prototype_update_, prototype_update_
from .proxy_attention import proxy_attention

__all__ = ["masked_prototype_update_", "prototype_update_", "proxy_attention"]
