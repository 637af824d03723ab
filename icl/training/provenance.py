"""What ran: package versions and the git commit of the checkout (``metrics.json``)."""
from __future__ import annotations

import os
import platform
import subprocess
from typing import Dict, Optional

import numpy as np
import torch

__all__ = ["versions"]


def versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    def _ver(pkg):
        try:
            return metadata.version(pkg)
        except Exception:
            return None

    commit = None
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        if commit:
            dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            if dirty:
                commit += "-dirty"
    except Exception:
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": _ver("triton"),
            "icl": _ver("icl-kernels") or "0.1.0", "numpy": np.__version__, "git_commit": commit}
