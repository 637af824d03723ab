"""The backbone registry: what the rest of ``icl`` asks about a backbone.

One :class:`BackboneSpec` per backbone says how to build it, which spatial
dimensions it takes, what patch sizes it needs, and where and how wide the ICL
heads attach. ``build_backbone``, ``build_model``, ``icl.attach`` users, the
training options (``--model`` choices, ``--patch-size`` checks) and checkpoints
all read it, so adding a backbone is its own file plus one ``register_backbone``
line below (docs/extending.md shows one).

Registration order is the order of ``--model``'s choices.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

from torch import nn

from ..errors import or_list
from . import swinunetr as _swinunetr
from .unet import UNet2D, UNet3D

__all__ = ["BACKBONES", "BackboneSpec", "arch_for", "build_backbone", "get_backbone", "model_names",
           "register_backbone"]


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone as ``icl`` sees it.

    name: the architecture name checkpoints record (``build_backbone(name, ...)``).
    build: ``build(in_channels, num_classes, spatial_dims, **options) -> nn.Module``, or its
        ``"module:function"`` path (imported when first built, so registering costs nothing).
    spatial_dims: the dimensions it comes in (2, 3 or both).
    patch_multiple: every patch size must be a positive multiple of it (its total downsampling).
    strides: downsampling of each map the ICL heads read, coarse to fine.
    layout: ``layout(options) -> (channels, heads)`` of those maps.
    feature_modules: the submodules whose outputs are those maps (read with a
        ``FeatureTap``); None: the backbone returns them itself from
        ``backbone(x, return_features=True)``.
    model: the ``--model`` name (several specs may share one: ``unet`` is
        ``unet2d`` for 2-D patches and ``unet3d`` for 3-D ones).
    takes_options: whether ``model_options`` / ``**options`` reach ``build``.
    takes_patch: whether ``build`` gets the training patch as ``patch=`` (None when unknown), for
        a network built for one input size.
    one_voxel_bottleneck: False where the bottleneck's normalisation
        (InstanceNorm) cannot train on a single voxel.
    title: a human name for messages.
    """

    name: str
    build: Union[Callable[..., nn.Module], str]
    spatial_dims: Tuple[int, ...]
    patch_multiple: int
    strides: Tuple[int, ...]
    layout: Callable[[Dict[str, Any]], Tuple[Sequence[int], Sequence[int]]]
    feature_modules: Optional[Tuple[str, ...]] = None
    model: Optional[str] = None
    takes_options: bool = True
    takes_patch: bool = False
    one_voxel_bottleneck: bool = True
    title: str = ""

    def builder(self) -> Callable[..., nn.Module]:
        if callable(self.build):
            return self.build
        module, _, attr = self.build.partition(":")
        return getattr(importlib.import_module(module), attr)

    @property
    def model_name(self) -> str:
        return self.model or self.name

    def patch_problem(self, patch_size: Sequence[int]) -> Optional[str]:
        """Why this backbone cannot train on ``patch_size`` (None: it can)."""
        patch = [int(p) for p in patch_size]
        if len(patch) not in self.spatial_dims:
            return f"{self.name} needs a {' or '.join(f'{d}-D' for d in self.spatial_dims)} patch_size"
        m = self.patch_multiple
        if any(p <= 0 or p % m for p in patch):
            return f"every size must be a positive multiple of {m} ({self.name} downsamples {m}x)"
        if not self.one_voxel_bottleneck and all(p == m for p in patch):
            return (f"{self.name} would have a single-voxel bottleneck, which its InstanceNorm cannot normalise "
                    f"in training; make at least one size {2 * m} or more")
        return None

    def feature_sizes(self, patch_size: Sequence[int]):
        return [tuple(int(p) // s for p in patch_size) for s in self.strides]


BACKBONES: Dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if not spec.spatial_dims or any(d not in (2, 3) for d in spec.spatial_dims):
        raise ValueError(f"register_backbone: {spec.name}: spatial_dims must be 2 and/or 3, got {spec.spatial_dims}")
    BACKBONES[spec.name] = spec
    return spec


def get_backbone(arch: str, who: str = "build_backbone") -> BackboneSpec:
    if arch not in BACKBONES:
        raise ValueError(f"{who}: arch must be one of {sorted(BACKBONES)}, got {arch!r}")
    return BACKBONES[arch]


def model_names() -> Tuple[str, ...]:
    """The ``--model`` values, in registration order."""
    return tuple(dict.fromkeys(s.model_name for s in BACKBONES.values()))


def arch_for(model: str, spatial_dims: int) -> str:
    """The registered architecture of ``--model model`` for patches of ``spatial_dims`` axes."""
    specs = [s for s in BACKBONES.values() if s.model_name == model]
    if not specs:
        raise ValueError(f"--model {model!r}: expected {or_list(model_names())}")
    for s in specs:
        if spatial_dims in s.spatial_dims:
            return s.name
    dims = sorted({d for s in specs for d in s.spatial_dims})
    raise ValueError(f"--model {model} takes {or_list(dims)} patch sizes, got {spatial_dims}")


def build_backbone(arch: str, in_channels: int, num_classes: int, patch_size: Optional[Sequence[int]] = None,
                   **options: Any) -> nn.Module:
    """A bare segmentation backbone by registered name: ``"unet2d"``, ``"unet3d"`` (the
    published UNets) or ``"swinunetr"`` (MONAI's SwinUNETR; ``options``: feature_size
    (default 48, as the published BraTS scripts), depths, num_heads,
    dropout_path_rate, ..., any SwinUNETR argument; 2D or 3D from
    ``spatial_dims`` or the length of ``patch_size``)."""
    spec = get_backbone(arch)
    opts = dict(options)
    dims = opts.pop("spatial_dims", None)
    if dims is None:
        if patch_size is not None:
            dims = len(patch_size)
        elif len(spec.spatial_dims) == 1:
            dims = spec.spatial_dims[0]
        else:
            raise ValueError(f"build_backbone: {arch} needs spatial_dims or patch_size")
    if int(dims) not in spec.spatial_dims:
        raise ValueError(f"build_backbone: {arch} spatial_dims must be {or_list(spec.spatial_dims)}, "
                         f"got {dims}")
    if opts and not spec.takes_options:
        raise ValueError(f"build_backbone: {arch} takes no options, got {sorted(opts)}")
    if patch_size is not None:
        if len(patch_size) != int(dims):
            raise ValueError(f"build_backbone: patch_size {tuple(patch_size)} does not have {dims} entries")
        problem = spec.patch_problem(patch_size)
        if problem:
            raise ValueError(f"build_backbone: patch_size {tuple(int(p) for p in patch_size)}: {problem}")
    if spec.takes_patch:
        opts["patch"] = None if patch_size is None else tuple(int(p) for p in patch_size)
    return spec.builder()(int(in_channels), int(num_classes), int(dims), **opts)


def _unet(cls):
    def build(in_channels: int, num_classes: int, spatial_dims: int) -> nn.Module:
        return cls(in_channels, num_classes)
    return build


register_backbone(BackboneSpec(
    "unet2d", _unet(UNet2D), spatial_dims=(2,), patch_multiple=16, strides=(8, 4, 2),
    layout=lambda options: ((128, 64, 32), (8, 4, 2)), model="unet", takes_options=False, title="UNet2D"))
register_backbone(BackboneSpec(
    "unet3d", _unet(UNet3D), spatial_dims=(3,), patch_multiple=16, strides=(16, 8, 4),
    layout=lambda options: ((256, 128, 64), (16, 8, 4)), model="unet", takes_options=False,
    one_voxel_bottleneck=False, title="UNet3D"))
register_backbone(BackboneSpec(
    "swinunetr", "icl.models.swinunetr:build_swinunetr", spatial_dims=(2, 3), patch_multiple=32,
    strides=_swinunetr.SWINUNETR_STRIDES, layout=_swinunetr.swinunetr_layout,
    feature_modules=_swinunetr.SWINUNETR_FEATURES, one_voxel_bottleneck=False, title="MONAI SwinUNETR"))
register_backbone(BackboneSpec(
    "swinunet", "icl.models.swinunet:build_swinunet", spatial_dims=(2,), patch_multiple=32, strides=(16, 8, 4),
    layout=lambda o: importlib.import_module("icl.models.swinunet").swinunet_layout(o), takes_patch=True,
    title="Swin-Unet"))
