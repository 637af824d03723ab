"""icl: semi-supervised medical image segmentation with Inherent Consistent Learning."""
from .losses import LossWeights, consistency_rampup, icl_losses
from .models import ICLHead, ICLNet, ICLOutputs, UNet2D, UNet3D, attach, build_backbone, build_model

__all__ = [
    "ICLHead",
    "ICLNet",
    "ICLOutputs",
    "LossWeights",
    "UNet2D",
    "UNet3D",
    "attach",
    "build_backbone",
    "build_model",
    "consistency_rampup",
    "icl_losses",
]

# Data, training, evaluation and inference (icl/data, icl/train.py, icl/inference.py, icl/cli.py).
# ``icl.train`` is the trainer module: ``from icl.train import train, TrainConfig``.
from .inference import predict  # noqa: E402

__all__ += ["predict"]
