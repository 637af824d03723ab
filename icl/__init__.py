"""icl: semi-supervised medical image segmentation with Inherent Consistent Learning.

The names below load on first use, so ``import icl`` is cheap and changes nothing
in the process (the ``icl`` command sets its thread environment itself, before
torch loads: icl.cli.main). Data, training, evaluation and inference live in
``icl.data``, ``icl.train`` (``from icl.train import train, TrainConfig``),
``icl.inference`` and ``icl.cli``.
"""
import importlib as _importlib

_EXPORTS = {
    "LossWeights": "losses", "consistency_rampup": "losses", "icl_losses": "losses",
    "ICLHead": "models", "ICLNet": "models", "ICLOutputs": "models", "UNet2D": "models", "UNet3D": "models",
    "attach": "models", "build_backbone": "models", "build_model": "models",
    "predict": "inference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
