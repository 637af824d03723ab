"""Loads the compiled extension ``icl_kernels._C`` if it was built.

Importing ``icl_kernels`` never fails because of the extension: the `cpu` and
`cuda` backends report the load error as the reason they are unavailable.
"""
from __future__ import annotations

from typing import Optional

import torch

LOAD_ERROR: Optional[BaseException] = None
try:  # the import runs the extension's TORCH_LIBRARY registrations
    from . import _C  # type: ignore[attr-defined]  # noqa: F401
except ImportError as exc:  # not built, or built against another torch (ABI)
    LOAD_ERROR = exc


def is_loaded() -> bool:
    return LOAD_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``icl_kernels::<op>`` has a kernel registered for the dispatch key."""
    if not is_loaded():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"icl_kernels::{op}", dispatch_key)
    except RuntimeError:  # the op schema itself is unknown
        return False


def load_error_message() -> str:
    return (
        f"the compiled extension icl_kernels._C could not be imported ({LOAD_ERROR}); "
        "build it with `pip install --no-build-isolation -e .` against the torch you run"
    )
