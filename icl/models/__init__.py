"""ICL models: the published backbones, the ICL head and the full ICL network."""
from .attach import FeatureTap, attach, build_backbone, default_heads, set_patch_size
from .head import ClassDecoder, ConvMixer, DropPath, ICLHead
from .icl_net import ARCHS, ICLNet, ICLOutputs, build_model, class_presence
from .unet import UNet2D, UNet3D

__all__ = [
    "ARCHS",
    "FeatureTap",
    "attach",
    "build_backbone",
    "default_heads",
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
