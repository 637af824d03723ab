"""icl: semi-supervised medical image segmentation with Inherent Consistent Learning."""
from .losses import LossWeights, consistency_rampup, icl_losses
from .models import ICLHead, ICLNet, ICLOutputs, UNet2D, UNet3D, build_model

__all__ = [
    "ICLHead",
    "ICLNet",
    "ICLOutputs",
    "LossWeights",
    "UNet2D",
    "UNet3D",
    "build_model",
    "consistency_rampup",
    "icl_losses",
]
