"""Developer tools, run from a checkout (``python -m tools.<name>``); not installed with the packages.

- ``triton_compile_report``: compiles every Triton kernel variant for a GPU target
  and reports register spills from ptxas (CI runs it in tests/test_triton_compile.py).
"""
