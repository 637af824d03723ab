"""Views of the unlabeled batch that semi-supervised methods compare, made on
the tensor (any device) with the torch RNG, so that resuming a run restores
them exactly (the trainer checkpoints the RNG states).

Images are [B, C, *S] after the data pipeline's own (weak) augmentation;
intensities of the demo/benchmark data lie in about [0, 1].
"""
from __future__ import annotations

import torch
from torch import Tensor


def gaussian_noise(x: Tensor, std: float = 0.1, clip: float = 0.2) -> Tensor:
    """x + clamp(N(0, std^2), -clip, clip): the Mean Teacher input noise of SSL4MIS."""
    return x + torch.clamp(torch.randn_like(x) * std, -clip, clip)


def _per_sample(x: Tensor, lo: float, hi: float) -> Tensor:
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    return torch.empty(shape, device=x.device, dtype=x.dtype).uniform_(lo, hi)


def random_intensity_curve(x: Tensor, knots: int = 4) -> Tensor:
    """A random piecewise-linear remap of each sample's intensities (per channel):
    values at ``knots`` equally spaced points of [0, 1] drawn in [0, 1], 0 kept
    at 0 (background stays background). Monotone or not: a stand-in for the
    tissue-contrast changes between scanners and sequences."""
    B, C = x.shape[:2]
    ys = torch.rand(B, C, knots, device=x.device, dtype=x.dtype)
    ys = torch.cat([torch.zeros(B, C, 1, device=x.device, dtype=x.dtype), ys], dim=2)  # [B, C, knots + 1]
    t = x.clamp(0.0, 1.0).reshape(B, C, -1) * knots
    i0 = t.floor().clamp(max=knots - 1)
    w = t - i0
    i0 = i0.long()
    y0 = torch.gather(ys, 2, i0)
    y1 = torch.gather(ys, 2, i0 + 1)
    return (y0 + w * (y1 - y0)).reshape(x.shape)


def strong_intensity(x: Tensor, p_curve: float = 0.5) -> Tensor:
    """The strong view's intensity part: with probability ``p_curve`` a random
    intensity curve, then a random gamma, contrast, brightness and noise per sample."""
    B = x.shape[0]
    use_curve = (torch.rand(B, device=x.device) < p_curve).view((B,) + (1,) * (x.dim() - 1))
    out = torch.where(use_curve, random_intensity_curve(x), x)
    out = out.clamp(min=0.0) ** torch.exp(_per_sample(out, -0.5, 0.5))
    out = out * _per_sample(out, 0.7, 1.3) + _per_sample(out, -0.1, 0.1)
    return out + torch.randn_like(out) * _per_sample(out, 0.0, 0.08)


@torch.compiler.disable
def cutout(x: Tensor, p: float = 0.5, max_frac: float = 0.4):
    """With probability ``p`` per sample, zero a random box of up to ``max_frac`` of
    each side. Returns (image, keep) with keep [B, *S] False inside the boxes, so a
    loss can ignore pixels whose content was removed.

    Host-side Python on random numbers drawn one at a time (whether, how large, where): under
    ``torch.compile`` (``--compile``) it runs eagerly, one graph break instead of a traced fragment
    for each draw."""
    out = x.clone()
    spatial = x.shape[2:]
    keep = torch.ones((x.shape[0],) + tuple(spatial), dtype=torch.bool, device=x.device)
    for b in range(x.shape[0]):
        if float(torch.rand(())) >= p:
            continue
        sl = []
        for s in spatial:
            n = max(1, int(float(torch.rand(())) * max_frac * s))
            a = int(torch.randint(0, s - n + 1, ()))
            sl.append(slice(a, a + n))
        out[(b, slice(None)) + tuple(sl)] = 0.0
        keep[(b,) + tuple(sl)] = False
    return out, keep


def strong_view(x: Tensor):
    """Strong intensity perturbation then cutout (FixMatch/UniMatch-style strong
    view). Returns (image, keep) as :func:`cutout`."""
    return cutout(strong_intensity(x))
