"""Plug-and-play: ICL on any segmentation backbone.

``attach(backbone, num_classes, feature_modules=[...])`` returns an ``ICLNet``
whose heads read the outputs of the named submodules of ``backbone`` (taken
with forward hooks while the backbone runs its own, unchanged ``forward``).
Without ``feature_modules`` the backbone must follow the project's contract:
``backbone(x, return_features=True) -> (logits, [maps, coarse to fine])``.

``build_backbone("swinunetr", ...)`` builds MONAI's ``SwinUNETR`` (optional
extra ``monai``); ``build_model("swinunetr", ...)`` attaches ICL to it through
``attach``, where the published ``SwinUNETR_icl`` attaches it: the outputs of
``decoder5``, ``decoder4``, ``decoder3`` (8F, 4F, 2F channels at 1/16, 1/8,
1/4 of the input for feature size F), with the backbone's first three head
counts reversed.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["attach", "build_backbone", "default_heads", "set_patch_size", "FeatureTap", "SWINUNETR_FEATURES"]

# where the published SwinUNETR_icl takes its three ICL inputs (dec3, dec2, dec1 there)
SWINUNETR_FEATURES = ("decoder5", "decoder4", "decoder3")
_SWINUNETR_STRIDES = (16, 8, 4)

ModuleRef = Union[str, nn.Module]


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


def default_heads(channels: int) -> int:
    """Heads of width 16 (the published UNets' ratio: 128/8, 256/16), at least 1, dividing ``channels``."""
    h = max(1, int(channels) // 16)
    while channels % h:
        h -= 1
    return h


class FeatureTap:
    """Runs ``backbone(x)`` and collects the outputs of named submodules with forward hooks.

    Hooks are registered for one call and removed after it, so the backbone is
    left unchanged (state_dict, deepcopy, pickling, DDP). Each tapped module
    must run exactly once per forward and return a tensor.
    """

    def __init__(self, backbone: nn.Module, feature_modules: Sequence[ModuleRef]) -> None:
        names = dict((id(m), n) for n, m in backbone.named_modules())
        resolved: List[str] = []
        for ref in feature_modules:
            if isinstance(ref, nn.Module):
                if id(ref) not in names or names[id(ref)] == "":
                    raise ValueError("attach: feature_modules entry is a module that is not a submodule of the backbone")
                resolved.append(names[id(ref)])
            elif isinstance(ref, str):
                try:
                    backbone.get_submodule(ref)
                except AttributeError as exc:
                    raise ValueError(f"attach: feature_modules names {ref!r}, which the backbone does not have "
                                     f"({type(backbone).__name__}); see backbone.named_modules()") from exc
                resolved.append(ref)
            else:
                raise ValueError(f"attach: feature_modules entries must be submodule names or modules, got {type(ref).__name__}")
        if not resolved:
            raise ValueError("attach: feature_modules must name at least one submodule")
        self.names: Tuple[str, ...] = tuple(resolved)

    def __call__(self, backbone: nn.Module, x: Tensor) -> Tuple[Tensor, List[Tensor]]:
        got: Dict[int, Tensor] = {}
        handles = []

        def hook_for(i: int, name: str):
            def hook(module, inputs, output):
                if i in got:
                    raise RuntimeError(f"attach: feature module {name!r} ran more than once in one forward; "
                                       f"tap a module that runs once")
                if not isinstance(output, Tensor):
                    raise RuntimeError(f"attach: feature module {name!r} returned {type(output).__name__}, "
                                       f"not a tensor; tap a submodule whose output is the feature map")
                got[i] = output
            return hook

        try:
            for i, name in enumerate(self.names):
                handles.append(backbone.get_submodule(name).register_forward_hook(hook_for(i, name)))
            logits = backbone(x)
        finally:
            for h in handles:
                h.remove()
        missing = [n for i, n in enumerate(self.names) if i not in got]
        if missing:
            raise RuntimeError(f"attach: feature module(s) {missing} did not run in the backbone's forward")
        if isinstance(logits, (tuple, list)):
            raise RuntimeError(f"attach: the backbone returned a {type(logits).__name__}; a tapped backbone must "
                               f"return the logits tensor (wrap it, or give it return_features and no feature_modules)")
        return logits, [got[i] for i in range(len(self.names))]


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
    from .icl_net import ICLNet

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


def set_patch_size(module: nn.Module, patch_size: Sequence[int]) -> None:
    """Record the training patch on a backbone for ``icl.predict``: as ``icl_patch_size``,
    and as ``patch_size`` unless the module uses that name for something else
    (MONAI's SwinUNETR: its patch-embedding size)."""
    patch = tuple(int(p) for p in patch_size)
    module.icl_patch_size = patch
    if not hasattr(module, "patch_size") or getattr(module, "icl_owns_patch_size", False):
        module.patch_size = patch
        module.icl_owns_patch_size = True


# ------------------------------------------------------------------ backbones


def build_backbone(arch: str, in_channels: int, num_classes: int, patch_size: Optional[Sequence[int]] = None,
                   **options: Any) -> nn.Module:
    """A bare segmentation backbone by name: ``"unet2d"``, ``"unet3d"`` (the published
    UNets) or ``"swinunetr"`` (MONAI's SwinUNETR; ``options``: feature_size
    (default 48, as the published BraTS scripts), depths, num_heads,
    dropout_path_rate, ..., any SwinUNETR argument; 2D or 3D from
    ``spatial_dims`` or the length of ``patch_size``)."""
    from .unet import UNet2D, UNet3D

    if arch in ("unet2d", "unet3d"):
        if options:
            raise ValueError(f"build_backbone: {arch} takes no options, got {sorted(options)}")
        return (UNet2D if arch == "unet2d" else UNet3D)(int(in_channels), int(num_classes))
    if arch == "swinunetr":
        _require_monai("the swinunetr backbone")
        from monai.networks.nets import SwinUNETR

        opts = dict(options)
        dims = opts.pop("spatial_dims", None)
        if dims is None:
            if patch_size is None:
                raise ValueError("build_backbone: swinunetr needs spatial_dims or patch_size")
            dims = len(patch_size)
        if int(dims) not in (2, 3):
            raise ValueError(f"build_backbone: swinunetr spatial_dims must be 2 or 3, got {dims}")
        if patch_size is not None:
            if len(patch_size) != int(dims):
                raise ValueError(f"build_backbone: patch_size {tuple(patch_size)} does not have {dims} entries")
            if any(int(p) <= 0 or int(p) % 32 for p in patch_size):
                raise ValueError(f"build_backbone: swinunetr needs every patch_size entry a positive multiple of 32 "
                                 f"(it downsamples 32x), got {tuple(patch_size)}")
            if all(int(p) == 32 for p in patch_size):
                raise ValueError(f"build_backbone: swinunetr with patch_size {tuple(patch_size)} has a single-voxel "
                                 f"bottleneck, which its InstanceNorm cannot normalise; make one size 64 or more")
        opts.setdefault("feature_size", 48)
        try:
            return SwinUNETR(in_channels=int(in_channels), out_channels=int(num_classes), spatial_dims=int(dims),
                             **opts)
        except TypeError as exc:
            raise ValueError(f"build_backbone: swinunetr option(s) not accepted by MONAI's SwinUNETR: {exc}") from exc
    raise ValueError(f"build_backbone: arch must be one of ['swinunetr', 'unet2d', 'unet3d'], got {arch!r}")


def swinunetr_icl_layout(feature_size: int, num_heads: Sequence[int] = (3, 6, 12, 24)):
    """Channels and heads of the published SwinUNETR_icl heads: (8F, 4F, 2F), num_heads[::-1][:3]."""
    F = int(feature_size)
    return (8 * F, 4 * F, 2 * F), tuple(int(h) for h in tuple(num_heads)[::-1][:3])
