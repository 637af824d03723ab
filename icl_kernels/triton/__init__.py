"""Triton kernels (the `triton` backend).

On a GPU they run compiled; on CPU tensors they run only through Triton's
interpreter (``TRITON_INTERPRET=1`` set before Triton is imported).
"""
from __future__ import annotations

import os
from typing import Optional

import torch


def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"Triton is not installed ({exc}); `pip install triton`"
    return None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: torch.device) -> Optional[str]:
    err = _triton_import_error()
    if err is not None:
        return err
    if device.type == "cpu":
        if not interpreting():
            return "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before importing)"
        return None
    if device.type != "cuda":
        return f"Triton kernels run on cuda tensors, not {device.type}"
    if not torch.cuda.is_available():
        return "no GPU is visible (torch.cuda.is_available() is False)"
    return None


# Kernels of each op (the backend's `<op>_forward` / `<op>_backward`); without
# Triton the package still imports and `unavailable_reason` says why it cannot run.
try:
    from .proxy_attention import proxy_attention_backward, proxy_attention_forward  # noqa: F401
except ImportError:  # pragma: no cover - Triton missing
    pass
try:
    from .prototype_update import prototype_update_backward, prototype_update_forward  # noqa: F401
except ImportError:  # pragma: no cover - Triton missing
    pass
