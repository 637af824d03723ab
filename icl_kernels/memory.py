"""``PrototypeMemory``: a running average of class prototypes (ICL's global
semantic representations), updated by the fused prototype update ops."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .ops.prototype_update import masked_prototype_update_, prototype_update_


class PrototypeMemory(nn.Module):
    """Per-class prototypes G [K, C] kept as a momentum average over training.

    ``G[k] <- momentum * G[k] + (1 - momentum) * mean_k`` for every class seen
    in the batch (all ranks when distributed); the first update of a class
    copies its mean (a zero-initialised memory would otherwise stay biased
    towards zero for hundreds of steps); unseen classes keep their value.

    Args:
        num_classes: K.
        dim: C.
        momentum: in [0, 1].
        ignore_index: label skipped by :meth:`update_from_features`.
        process_group: passed to the ops (default: the world group when
            torch.distributed is initialised).
        deterministic, check_labels, backend: passed to the ops.
        dtype, device: of the prototypes (default float32, CPU).

    Buffers (in ``state_dict``, moved by ``.to()``): ``prototypes`` [K, C] and
    ``initialized`` bool [K].

    Example:
        >>> import torch, icl_kernels
        >>> mem = icl_kernels.PrototypeMemory(num_classes=3, dim=16, momentum=0.99)
        >>> feats, labels = torch.randn(2, 16, 8, 8), torch.randint(0, 3, (2, 8, 8))
        >>> means, totals = mem.update_from_features(feats, labels=labels)
        >>> bool(mem.initialized.all()), mem().shape
        (True, torch.Size([3, 16]))
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        momentum: float = 0.99,
        *,
        ignore_index: int = -100,
        process_group=None,
        deterministic: bool = True,
        check_labels: bool = True,
        backend: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"PrototypeMemory: num_classes must be an int >= 1, got {num_classes!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"PrototypeMemory: dim must be an int >= 1, got {dim!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"PrototypeMemory: momentum must be a number in [0, 1], got {momentum!r}")
        self.num_classes = num_classes
        self.dim = dim
        self.momentum = float(momentum)
        self.ignore_index = ignore_index
        self.process_group = process_group
        self.deterministic = deterministic
        self.check_labels = check_labels
        self.backend = backend
        self.register_buffer("prototypes", torch.zeros(num_classes, dim, dtype=dtype or torch.float32, device=device))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool, device=device))

    def update(self, values: Tensor, weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Update from per-sample class vectors values [B, K, C] (weights [B, K] or None);
        returns (means, totals) of :func:`icl_kernels.prototype_update_`."""
        return prototype_update_(
            self.prototypes, values, weights, momentum=self.momentum, initialized=self.initialized,
            process_group=self.process_group, deterministic=self.deterministic, backend=self.backend,
        )

    def update_from_features(
        self, features: Tensor, labels: Optional[Tensor] = None, probs: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor]:
        """Update from a feature map [B, C, *spatial] and labels [B, *spatial] or
        probs [B, K, *spatial]; returns (means, totals) of
        :func:`icl_kernels.masked_prototype_update_`."""
        return masked_prototype_update_(
            self.prototypes, features, labels=labels, probs=probs, momentum=self.momentum,
            ignore_index=self.ignore_index, initialized=self.initialized, process_group=self.process_group,
            deterministic=self.deterministic, check_labels=self.check_labels, backend=self.backend,
        )

    @torch.no_grad()
    def reset(self) -> None:
        self.prototypes.zero_()
        self.initialized.zero_()

    def forward(self) -> Tensor:
        """The prototypes [K, C], as a copy: a later in-place update cannot then
        invalidate a graph that used them."""
        return self.prototypes.clone()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, momentum={self.momentum}"
