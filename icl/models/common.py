"""Small rules every backbone shares: default head counts, the recorded training patch."""
from __future__ import annotations

from typing import Sequence

from torch import nn

__all__ = ["default_heads", "set_patch_size"]


def default_heads(channels: int) -> int:
    """Heads of width 16 (the published UNets' ratio: 128/8, 256/16), at least 1, dividing ``channels``."""
    h = max(1, int(channels) // 16)
    while channels % h:
        h -= 1
    return h


def set_patch_size(module: nn.Module, patch_size: Sequence[int]) -> None:
    """Record the training patch on a backbone for ``icl.predict``: as ``icl_patch_size``,
    and as ``patch_size`` unless the module uses that name for something else
    (MONAI's SwinUNETR: its patch-embedding size)."""
    patch = tuple(int(p) for p in patch_size)
    module.icl_patch_size = patch
    if not hasattr(module, "patch_size") or getattr(module, "icl_owns_patch_size", False):
        module.patch_size = patch
        module.icl_owns_patch_size = True
