"""The README's Python examples and the docstring examples run as written."""
import doctest
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_python_blocks():
    with open(os.path.join(ROOT, "README.md")) as fh:
        text = fh.read()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_python_examples_run():
    blocks = readme_python_blocks()
    assert blocks, "the README should show Python examples"
    try:
        import monai  # noqa: F401  (the "Other backbones" example; an optional extra)
    except ImportError:
        skipped = [b for b in blocks if "monai" in b]
        blocks = [b for b in blocks if "monai" not in b]
        if skipped:
            import warnings

            warnings.warn(f"MONAI not installed: {len(skipped)} README example(s) using it not run")
    namespace = {}
    # blocks build on each other, like a reader pasting them one after another
    exec(compile("\n".join(blocks), "README.md", "exec"), namespace)


@pytest.mark.parametrize("module", ["icl_kernels.backends", "icl_kernels.nn", "icl_kernels.ops.proxy_attention"])
def test_docstring_examples(module):
    import importlib

    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module} has no docstring examples"
    assert result.failed == 0
