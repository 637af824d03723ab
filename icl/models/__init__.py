"""ICL models: the published backbones, the ICL head and the full ICL network.

Imports run one way: ``registry`` (backbone specs) <- ``build`` (``build_model``)
-> ``attach`` -> ``icl_net`` -> ``head``, ``tap``.
"""
from .attach import attach
from .build import build_model
from .common import default_heads, set_patch_size
from .head import ClassDecoder, ConvMixer, DropPath, ICLHead
from .icl_net import ICLNet, ICLOutputs, class_presence
from .registry import BACKBONES, BackboneSpec, build_backbone, get_backbone, register_backbone
from .tap import FeatureTap
from .unet import UNet2D, UNet3D

__all__ = [
    "ARCHS",
    "BACKBONES",
    "BackboneSpec",
    "FeatureTap",
    "attach",
    "build_backbone",
    "default_heads",
    "get_backbone",
    "register_backbone",
    "set_patch_size",
    "ClassDecoder",
    "ConvMixer",
    "DropPath",
    "ICLHead",
    "ICLNet",
    "ICLOutputs",
    "UNet2D",
    "UNet3D",
    "build_model",
    "class_presence",
]


def __getattr__(name):
    if name == "ARCHS":  # the registered backbone names (a new registration shows at once)
        return tuple(BACKBONES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
