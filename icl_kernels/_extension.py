"""Loads the compiled extension ``icl_kernels._C`` if it was built.

Importing ``icl_kernels`` never fails because of the extension: the `cpu` and
`cuda` backends report the load error as the reason they are unavailable.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

LOAD_ERROR: Optional[BaseException] = None
try:  # the import runs the extension's TORCH_LIBRARY registrations
    from . import _C  # type: ignore[attr-defined]  # noqa: F401
except ImportError as exc:  # not built, or built against another torch (ABI)
    LOAD_ERROR = exc


def is_loaded() -> bool:
    return LOAD_ERROR is None


# Answers of the dispatcher, asked once: the extension registers its kernels when
# it is imported and nothing registers more later, while the question is asked on
# every call of an op (backend resolution) and costs tens of microseconds.
_HAS_KERNEL: Dict[Tuple[str, str], bool] = {}


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``icl_kernels::<op>`` has a kernel registered for the dispatch key."""
    if not is_loaded():
        return False
    key = (op, dispatch_key)
    if key not in _HAS_KERNEL:
        try:
            _HAS_KERNEL[key] = bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"icl_kernels::{op}", dispatch_key))
        except RuntimeError:  # the op schema itself is unknown
            _HAS_KERNEL[key] = False
    return _HAS_KERNEL[key]


def load_error_message() -> str:
    return (
        f"the compiled extension icl_kernels._C could not be imported ({LOAD_ERROR}); "
        "build it with `pip install --no-build-isolation -e .` against the torch you run"
    )
