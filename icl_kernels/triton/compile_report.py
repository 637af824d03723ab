"""Deprecated name of ``tools/triton_compile_report.py`` (a developer tool, not part of the
installed package): ``python -m icl_kernels.triton.compile_report ...`` still runs it from a
checkout, with a warning; use ``python -m tools.triton_compile_report ...``."""
import runpy
import sys
import warnings

_NEW = "tools.triton_compile_report"

warnings.warn(f"icl_kernels.triton.compile_report moved to {_NEW} (run python -m {_NEW} from a checkout)",
              DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    try:
        runpy.run_module(_NEW, run_name="__main__", alter_sys=True)
    except ImportError as exc:
        sys.exit(f"compile_report: {exc}; the tool lives in the repository's tools/ folder: run "
                 f"python -m {_NEW} from a checkout")
else:
    try:
        from tools.triton_compile_report import *  # noqa: F401,F403  (the old import name)
    except ImportError as exc:
        raise ImportError(f"icl_kernels.triton.compile_report moved to {_NEW}, which is not installed with the "
                          f"package; import it from a checkout") from exc
