"""Entry points of the `cpu` and `cuda` backends: the compiled kernels of
``icl_kernels._C``, reached through torch.ops (the dispatcher picks the CPU or
CUDA kernel from the tensors' device)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _extension  # noqa: F401  (loads the library that defines the ops)


def proxy_attention_forward(x: Tensor, A: Tensor, c: Tensor, eps: Optional[float]) -> Tuple[Tensor, Tensor, Tensor]:
    return torch.ops.icl_kernels._proxy_attention_forward(x, A, c, eps)


def proxy_attention_backward(grad_Z, grad_S, x, A, c, Z, lse, eps) -> Tuple[Tensor, Tensor, Tensor]:
    return torch.ops.icl_kernels._proxy_attention_backward(grad_Z, grad_S, x, A, c, Z, lse, eps)
