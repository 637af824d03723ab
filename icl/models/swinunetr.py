"""MONAI's SwinUNETR as an ICL backbone (optional extra ``monai``).

ICL reads it where the published ``SwinUNETR_icl`` does: the outputs of
``decoder5``, ``decoder4``, ``decoder3`` (8F, 4F, 2F channels at 1/16, 1/8, 1/4
of the input for feature size F), with the backbone's first three head counts
reversed.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

__all__ = ["SWINUNETR_FEATURES", "build_swinunetr", "swinunetr_icl_layout"]

# where the published SwinUNETR_icl takes its three ICL inputs (dec3, dec2, dec1 there)
SWINUNETR_FEATURES = ("decoder5", "decoder4", "decoder3")
SWINUNETR_STRIDES = (16, 8, 4)
DEFAULT_FEATURE_SIZE = 48  # the published BraTS scripts
DEFAULT_NUM_HEADS = (3, 6, 12, 24)  # MONAI's default


def _require_monai(what: str):
    try:
        import monai  # noqa: F401
        from monai.networks.nets import SwinUNETR  # noqa: F401
        import einops  # noqa: F401  (SwinUNETR's window attention needs it)
    except ImportError as exc:
        raise ImportError(
            f"{what} needs MONAI (and einops), which are not installed: pip install 'icl-kernels[monai]' "
            f"(or pip install monai einops); import failed with: {exc}"
        ) from exc


def build_swinunetr(in_channels: int, num_classes: int, spatial_dims: int, **options: Any) -> nn.Module:
    """MONAI's SwinUNETR; ``options``: feature_size (default 48), depths, num_heads,
    dropout_path_rate, ..., any SwinUNETR argument."""
    _require_monai("the swinunetr backbone")
    from monai.networks.nets import SwinUNETR

    opts = dict(options)
    opts.setdefault("feature_size", DEFAULT_FEATURE_SIZE)
    try:
        return SwinUNETR(in_channels=int(in_channels), out_channels=int(num_classes), spatial_dims=int(spatial_dims),
                         **opts)
    except TypeError as exc:
        raise ValueError(f"build_backbone: swinunetr option(s) not accepted by MONAI's SwinUNETR: {exc}") from exc


def swinunetr_icl_layout(feature_size: int, num_heads: Sequence[int] = DEFAULT_NUM_HEADS):
    """Channels and heads of the published SwinUNETR_icl heads: (8F, 4F, 2F), num_heads[::-1][:3]."""
    F = int(feature_size)
    return (8 * F, 4 * F, 2 * F), tuple(int(h) for h in tuple(num_heads)[::-1][:3])


def swinunetr_layout(options):
    """(channels, heads) of the ICL heads for these SwinUNETR options."""
    return swinunetr_icl_layout(options.get("feature_size", DEFAULT_FEATURE_SIZE),
                                options.get("num_heads", DEFAULT_NUM_HEADS))
