"""Training methods under one trainer: each module owns what one training step of
its method needs (extra networks such as an EMA teacher, the views it makes of
the unlabeled batch, its loss). The trainer loop (icl/training/trainer.py) is the same for
all of them; adding a method is one file here plus one line in ``METHODS``.
"""
from __future__ import annotations

from typing import Dict, Type

from .base import Method
from .fixmatch import FixMatch
from .icl import ICLMethod
from .mean_teacher import MeanTeacher
from .supervised import Supervised
from .unimatch import UniMatch

METHODS: Dict[str, Type[Method]] = {
    "supervised": Supervised,
    "icl": ICLMethod,
    "mean-teacher": MeanTeacher,
    "fixmatch": FixMatch,
    "unimatch": UniMatch,
}

__all__ = ["METHODS", "Method", "FixMatch", "ICLMethod", "MeanTeacher", "Supervised", "UniMatch", "get_method"]


def get_method(name: str) -> Type[Method]:
    if name not in METHODS:
        raise ValueError(f"--method {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]
