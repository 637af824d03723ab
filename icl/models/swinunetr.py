"""MONAI's SwinUNETR as an ICL backbone (optional extra ``monai``).

ICL reads it where the published ``SwinUNETR_icl`` does: the outputs of
``decoder5``, ``decoder4``, ``decoder3`` (8F, 4F, 2F channels at 1/16, 1/8, 1/4
of the input for feature size F), with the backbone's first three head counts
reversed.

``patch_merging``: ``"monai"`` (default) keeps MONAI's downsampling, which reads
the 8 (3D) or 4 (2D) sub-voxels of each 2^d block; ``"published"`` swaps in
:class:`PublishedPatchMerging`, the gather of the Swin transformer vendored in
the published ``SwinUNETR_icl``: in 3D it reads offsets (0,1,0) and (0,0,1)
twice and (1,1,0), (0,1,1) never, so weights trained there only mean the same
network with it. Both have the same parameters (state_dicts load either way).
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["PATCH_MERGING", "PUBLISHED_OFFSETS_2D", "PUBLISHED_OFFSETS_3D", "PublishedPatchMerging",
           "SWINUNETR_FEATURES", "build_swinunetr", "swinunetr_icl_layout"]

# where the published SwinUNETR_icl takes its three ICL inputs (dec3, dec2, dec1 there)
SWINUNETR_FEATURES = ("decoder5", "decoder4", "decoder3")
SWINUNETR_STRIDES = (16, 8, 4)
DEFAULT_FEATURE_SIZE = 48  # the published BraTS scripts
DEFAULT_NUM_HEADS = (3, 6, 12, 24)  # MONAI's default

#: values of the ``patch_merging`` option
PATCH_MERGING = ("monai", "published")

# Sub-voxel offsets, (d, h, w) / (h, w), of each 2^d block in the order the published
# vendored PatchMerging concatenates them along channels. 3D: (0,1,0) and (0,0,1) come
# twice, (1,1,0) and (0,1,1) never. 2D: all four, in the same order as MONAI's.
PUBLISHED_OFFSETS_3D: Tuple[Tuple[int, int, int], ...] = (
    (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))
PUBLISHED_OFFSETS_2D: Tuple[Tuple[int, int], ...] = ((0, 0), (1, 0), (0, 1), (1, 1))


class PublishedPatchMerging(nn.Module):
    """2^d patch merging as the published ``SwinUNETR_icl`` computes it.

    ``[B, *S, C]`` (channels last, d = 2 or 3 spatial axes) -> ``[B, *S/2, 2C]``:
    concatenate ``x[offset::2]`` for each offset of ``PUBLISHED_OFFSETS_{d}D``,
    LayerNorm over the 2^d C channels, bias-free Linear to 2C. Same submodules
    (``norm``, ``reduction``) and constructor as MONAI's ``PatchMerging``, so it
    can be passed as SwinUNETR's ``downsample``.
    """

    def __init__(self, dim: int, norm_layer=nn.LayerNorm, spatial_dims: int = 3) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"PublishedPatchMerging: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.dim = int(dim)
        self.spatial_dims = int(spatial_dims)
        self.offsets = PUBLISHED_OFFSETS_3D if spatial_dims == 3 else PUBLISHED_OFFSETS_2D
        parts = len(self.offsets)
        # registered in MONAI's order, so state_dicts list the same keys in the same order
        self.reduction = nn.Linear(parts * self.dim, 2 * self.dim, bias=False)
        self.norm = norm_layer(parts * self.dim)

    def forward(self, x: Tensor) -> Tensor:
        d = self.spatial_dims
        if x.dim() != d + 2:
            raise ValueError(f"PublishedPatchMerging ({d}D): expected a [B, {d} spatial axes, C] tensor, "
                             f"got shape {tuple(x.shape)}")
        odd = [int(n) % 2 for n in x.shape[1:-1]]
        if any(odd):  # pad each odd axis at its end (unreachable through SwinUNETR: sizes are multiples of 32)
            pad = [0, 0]
            for o in reversed(odd):
                pad += [0, o]
            x = torch.nn.functional.pad(x, pad)
        parts = [x[(slice(None),) + tuple(slice(o, None, 2) for o in off)] for off in self.offsets]
        return self.reduction(self.norm(torch.cat(parts, dim=-1)))


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
    dropout_path_rate, ..., any SwinUNETR argument, and ``patch_merging``
    (``"monai"``, default, or ``"published"``: the published SwinUNETR_icl's
    downsampling, see the module docstring)."""
    _require_monai("the swinunetr backbone")
    from monai.networks.nets import SwinUNETR

    opts = dict(options)
    opts.setdefault("feature_size", DEFAULT_FEATURE_SIZE)
    merging = opts.pop("patch_merging", "monai")
    if merging not in PATCH_MERGING:
        raise ValueError(f"build_backbone: swinunetr option patch_merging must be one of "
                         f"{', '.join(repr(m) for m in PATCH_MERGING)}, got {merging!r}")
    if merging == "published":
        if "downsample" in opts:
            raise ValueError("build_backbone: swinunetr options patch_merging='published' and downsample="
                             f"{opts['downsample']!r} both choose the downsampling; give one of them")
        opts["downsample"] = PublishedPatchMerging
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
