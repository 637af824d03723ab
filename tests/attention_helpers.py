"""Helpers shared by the attention module tests."""
import torch


def randomize(module, seed=0):
    """Non-trivial parameters everywhere (LayerNorm affine included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] % 2 else 0.0))
    return module
