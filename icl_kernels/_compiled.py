"""Entry points of the `cpu` and `cuda` backends: the compiled kernels of
``icl_kernels._C``, reached through torch.ops (the dispatcher picks the CPU or
CUDA kernel from the tensors' device). The ``.default`` overloads: calling an
op's overload packet costs several microseconds more per call."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _extension  # noqa: F401  (loads the library that defines the ops)


def proxy_attention_forward(x: Tensor, A: Tensor, c: Tensor, eps: Optional[float]) -> Tuple[Tensor, Tensor, Tensor]:
    return torch.ops.icl_kernels._proxy_attention_forward.default(x, A, c, eps)


def proxy_attention_backward(grad_Z, grad_S, x, A, c, Z, lse, eps) -> Tuple[Tensor, Tensor, Tensor]:
    return torch.ops.icl_kernels._proxy_attention_backward.default(grad_Z, grad_S, x, A, c, Z, lse, eps)


def prototype_update_forward(features, labels, weights, probs, num_classes, ignore_index, check_labels, deterministic):
    if probs is not None:
        return torch.ops.icl_kernels._prototype_update_probs_forward.default(features, probs, deterministic)
    return torch.ops.icl_kernels._prototype_update_labels_forward.default(
        features, labels, weights, num_classes, ignore_index, check_labels, deterministic
    )


def prototype_update_backward(grad_sums, grad_totals, features, labels, weights, probs, ignore_index,
                              need_features_grad, need_aux_grad):
    if probs is not None:
        gf, ga = torch.ops.icl_kernels._prototype_update_probs_backward.default(
            grad_sums, grad_totals, features, probs, need_features_grad, need_aux_grad
        )
    else:
        gf, ga = torch.ops.icl_kernels._prototype_update_labels_backward.default(
            grad_sums, grad_totals, features, labels, weights, ignore_index, need_features_grad, need_aux_grad
        )
    return (gf if need_features_grad else None), (ga if need_aux_grad else None)
