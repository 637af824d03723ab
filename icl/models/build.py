"""``build_model``: an ICL network from a registered backbone name."""
from __future__ import annotations

from typing import Optional, Sequence

from .attach import attach
from .common import set_patch_size
from .icl_net import ICLNet
from .registry import build_backbone, get_backbone

__all__ = ["build_model"]


def build_model(
    arch: str,
    in_channels: int,
    num_classes: int,
    patch_size: Sequence[int],
    mixer: str = "conv",
    global_queries: str = "batch",
    faithful: bool = False,
    backend: Optional[str] = None,
    max_mixer_params: Optional[int] = 50_000_000,
    momentum: float = 0.99,
    spatial_dims: Optional[int] = None,
    **backbone_options,
) -> ICLNet:
    """An ICL model by registered backbone name (:mod:`icl.models.registry`).

    ``"unet2d"``: ICL on 128/64/32 ch at patch/8, /4, /2, heads 8/4/2;
    ``"unet3d"``: 256/128/64 ch at patch/16, /8, /4, heads 16/8/4 (the published
    UNets); ``"swinunetr"``: MONAI's SwinUNETR (extra ``monai``; 2D or 3D from
    ``spatial_dims`` or ``len(patch_size)``; ``backbone_options`` go to
    SwinUNETR, feature_size F default 48) with ICL where the published
    ``SwinUNETR_icl`` puts it: on ``decoder5``, ``decoder4``, ``decoder3``
    (8F/4F/2F ch at patch/16, /8, /4), heads ``num_heads[::-1][:3]``, attached
    through ``icl.attach`` as any other backbone.
    """
    spec = get_backbone(arch, who="build_model")
    patch = tuple(int(p) for p in patch_size)
    dims = len(patch) if spatial_dims is None else int(spatial_dims)
    if dims not in spec.spatial_dims:
        raise ValueError(f"build_model: {arch} is {' or '.join(f'{d}-D' for d in spec.spatial_dims)}, "
                         f"got spatial_dims={dims}")
    if len(patch) != dims:
        raise ValueError(f"build_model: {arch} with spatial_dims={dims} needs a {dims}-D patch_size, got {patch}")
    problem = spec.patch_problem(patch)
    if problem:
        raise ValueError(f"build_model: patch_size {patch}: {problem}")
    if backbone_options and not spec.takes_options:
        raise ValueError(f"build_model: {arch} takes no backbone options, got {sorted(backbone_options)}")
    head_opts = dict(mixer=mixer, global_queries=global_queries, faithful=faithful, momentum=momentum,
                     backend=backend, max_mixer_params=max_mixer_params)
    opts = dict(backbone_options)
    if len(spec.spatial_dims) > 1:
        opts["spatial_dims"] = dims
    backbone = build_backbone(arch, in_channels, num_classes, patch, **opts)
    channels, heads = spec.layout(backbone_options)
    sizes = spec.feature_sizes(patch)
    if spec.feature_modules is not None:
        return attach(backbone, num_classes, feature_modules=spec.feature_modules, channels=channels,
                      num_heads=heads, patch_size=patch, feature_sizes=sizes, spatial_dims=dims, **head_opts)
    net = ICLNet(backbone, channels, num_classes, heads, feature_sizes=sizes, spatial_dims=dims, **head_opts)
    if faithful and getattr(backbone, "icl_raw_tokens", False):  # published Swin-Unet: heads read its tokens as they are
        for head in (net.sspa, net.uscl):
            head.read_raw_tokens()
    # the training patch: what icl.predict resizes slices to / slides windows of by default
    net.patch_size = patch
    set_patch_size(backbone, patch)
    return net

