"""Plug-and-play: ICL on any segmentation backbone.

``attach(backbone, num_classes, feature_modules=[...])`` returns an ``ICLNet``
whose heads read the outputs of the named submodules of ``backbone`` (taken
with forward hooks while the backbone runs its own, unchanged ``forward``).
Without ``feature_modules`` the backbone must follow the project's contract:
``backbone(x, return_features=True) -> (logits, [maps, coarse to fine])``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from .common import default_heads, set_patch_size
from .icl_net import ICLNet
from .tap import FeatureTap, ModuleRef

__all__ = ["attach"]


def _probe(backbone: nn.Module, tap: Optional[FeatureTap], in_channels: int, patch_size: Sequence[int]):
    """Channels and spatial sizes of the feature maps, from one no-grad forward on zeros (eval mode)."""
    was = backbone.training
    backbone.eval()
    try:
        p = next(backbone.parameters(), None)
        x = torch.zeros((1, in_channels) + tuple(patch_size), device=None if p is None else p.device,
                        dtype=torch.float32 if p is None else p.dtype)
        with torch.no_grad():
            if tap is not None:
                _, feats = tap(backbone, x)
            else:
                out = backbone(x, return_features=True)
                if not (isinstance(out, (tuple, list)) and len(out) == 2):
                    raise ValueError("attach: without feature_modules the backbone must return (logits, feats) "
                                     "from backbone(x, return_features=True)")
                feats = list(out[1])
    finally:
        backbone.train(was)
    return [int(f.shape[1]) for f in feats], [tuple(int(s) for s in f.shape[2:]) for f in feats]


def _first_conv_in_channels(backbone: nn.Module) -> Optional[int]:
    for m in backbone.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
    return None


def attach(
    backbone: nn.Module,
    num_classes: int,
    feature_modules: Optional[Sequence[ModuleRef]] = None,
    channels: Optional[Sequence[int]] = None,
    num_heads: Optional[Sequence[int]] = None,
    patch_size: Optional[Sequence[int]] = None,
    in_channels: Optional[int] = None,
    feature_sizes: Optional[Sequence[Sequence[int]]] = None,
    **icl_options: Any,
):
    """Put ICL (SSPA + USCL heads) on ``backbone``; returns an ``ICLNet``.

    Args:
        backbone: any segmentation network whose ``forward(x)`` returns logits
            [B, num_classes, *S] (with ``feature_modules``), or one following the
            ``return_features`` contract (without).
        num_classes: K, the backbone's output channels.
        feature_modules: the submodules (names as in ``backbone.named_modules()``,
            or the modules) whose outputs the heads read, coarse to fine
            (typically three decoder stages). Each must run once per forward
            and return a [B, C_l, *spatial_l] tensor.
        channels: C_l per level; default: measured by one forward on zeros of
            ``patch_size``.
        num_heads: attention heads per level (each must divide C_l); default
            ``default_heads(C_l)`` (head width 16).
        patch_size: the training patch; needed to measure channels/sizes and by
            ``mixer="mlp"`` (whose Linear(N, N) fixes each level's size); also
            stored as ``net.patch_size`` for ``icl.predict``.
        in_channels: input channels for that measuring forward (default: the
            first convolution's).
        feature_sizes: spatial size per level (default: measured).
        icl_options: ``ICLNet`` options (mixer, faithful, global_queries,
            backend, drop_path, max_mixer_params, momentum).

    The ICL network keeps the backbone as ``net.backbone`` (its keys under
    ``backbone.``), so ``net.backbone.state_dict()`` is the backbone's own.
    ``net(x)`` is the backbone's logits; ``net.forward_train(x_lab, x_unlab)``
    the ICL training flow.
    """
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"attach: backbone must be a torch.nn.Module, got {type(backbone).__name__}")
    tap = FeatureTap(backbone, feature_modules) if feature_modules is not None else None
    mixer = icl_options.get("mixer", "conv")
    need_probe = channels is None or (mixer == "mlp" and feature_sizes is None)
    if need_probe:
        if patch_size is None:
            raise ValueError("attach: patch_size is required to measure the feature maps "
                             "(or give channels, and feature_sizes for mixer='mlp')")
        if in_channels is None:
            in_channels = _first_conv_in_channels(backbone)
            if in_channels is None:
                raise ValueError("attach: cannot tell the backbone's input channels; pass in_channels")
        got_ch, got_sizes = _probe(backbone, tap, int(in_channels), patch_size)
        if channels is not None and list(map(int, channels)) != got_ch:
            raise ValueError(f"attach: channels {list(channels)} given, but the feature maps have {got_ch}")
        channels = got_ch
        if feature_sizes is None:
            feature_sizes = got_sizes
    channels = [int(c) for c in channels]
    if num_heads is None:
        num_heads = [default_heads(c) for c in channels]
    num_heads = [int(h) for h in num_heads]
    if len(num_heads) != len(channels):
        raise ValueError(f"attach: num_heads {num_heads} needs one entry per feature map ({len(channels)})")
    bad = [(c, h) for c, h in zip(channels, num_heads) if h <= 0 or c % h]
    if bad:
        raise ValueError(f"attach: each num_heads entry must be a positive divisor of its level's channels; "
                         f"(channels, heads) {bad} are not")
    dims = icl_options.pop("spatial_dims", None)
    if dims is None:
        if patch_size is not None:
            dims = len(patch_size)
        elif feature_sizes is not None:
            dims = len(feature_sizes[0])
        else:
            raise ValueError("attach: give patch_size (or spatial_dims) so the heads know 2D from 3D")
    net = ICLNet(backbone, channels, num_classes, num_heads, feature_sizes=feature_sizes, spatial_dims=int(dims),
                 feature_tap=tap, **icl_options)
    if patch_size is not None:
        net.patch_size = tuple(int(p) for p in patch_size)
        set_patch_size(backbone, patch_size)
    return net
