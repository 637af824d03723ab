"""icl: semi-supervised medical image segmentation with Inherent Consistent Learning."""
import os as _os

# OpenMP threads that spin while waiting for work collapse when the cores are shared
# (measured: 2 threads on 2 busy cores ran a training step several times slower than 1;
# README "Threads"). Passive waiting avoids that cliff. It only takes effect when icl
# is imported before torch (the `icl` command always is); set OMP_WAIT_POLICY=ACTIVE
# to opt out.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
