"""Custom ops (torch.library namespace ``icl_kernels``), one file per op."""
from .proxy_attention import proxy_attention

__all__ = ["proxy_attention"]
