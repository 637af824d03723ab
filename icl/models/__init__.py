"""ICL models: the published backbones, the ICL head and the full ICL network."""
from .head import ClassDecoder, ConvMixer, DropPath, ICLHead
from .icl_net import ICLNet, ICLOutputs, build_model, class_presence
from .unet import UNet2D, UNet3D

__all__ = [
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
