"""The documentation holds: the Python examples of the README and of docs/*.md run
as written, their relative links point to files in the repository, and the docstring
examples run."""
import doctest
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rel(path):
    return os.path.relpath(path, ROOT).replace(os.sep, "/")


def _read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as fh:
        return fh.read()


# The documentation: the README and docs/*.md.
DOCS = ["README.md"] + sorted(_rel(p) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
# Hand-written results summaries next to their data (the tools write other .md files
# there too, such as benches.ssl's and gpu_check.sh's summary.md and the demo's report).
RESULTS_NOTES = [
    "benches/results/cpu/summary.md",
    "benches/results/cpu/mni_slab_demo.md",
    "benches/results/cpu/ssl/analysis.md",
    "benches/results/cpu/ssl-2000/analysis.md",
    "benches/results/nvidia-h200/findings.md",
    "benches/results/nvidia-h200/summary.md",
]
# Every markdown file under benches/results, for the link check.
RESULTS_MD = sorted(_rel(p) for p in glob.glob(os.path.join(ROOT, "benches", "results", "**", "*.md"),
                                               recursive=True))


def python_blocks(rel):
    return re.findall(r"```python\n(.*?)```", _read(rel), re.S)


DOCS_WITH_PYTHON = [rel for rel in DOCS if python_blocks(rel)]


def test_readme_and_docs_show_python_examples():
    assert "README.md" in DOCS_WITH_PYTHON, "the README should show Python examples"
    assert len(DOCS_WITH_PYTHON) > 1, "docs/*.md should show Python examples"


@pytest.fixture
def registries():
    """The examples may register methods, backbones and backends (docs/extending.md does):
    they are taken back after each page, so other tests see the library's own."""
    from icl.methods import METHODS
    from icl.models.registry import BACKBONES
    from icl_kernels import backends

    saved = [(reg, dict(reg)) for reg in (METHODS, BACKBONES, backends._REGISTRY)]
    yield
    for reg, copy in saved:
        reg.clear()
        reg.update(copy)


@pytest.mark.parametrize("rel", DOCS_WITH_PYTHON)
def test_python_examples_run(rel, registries):
    blocks = python_blocks(rel)
    try:
        import monai  # noqa: F401  (the "Other backbones" example; an optional extra)
    except ImportError:
        skipped = [b for b in blocks if "monai" in b]
        blocks = [b for b in blocks if "monai" not in b]
        if skipped:
            import warnings

            warnings.warn(f"MONAI not installed: {len(skipped)} {rel} example(s) using it not run")
        if not blocks:
            pytest.skip(f"MONAI not installed: every example of {rel} uses it")
    namespace = {}
    # blocks build on each other, like a reader pasting them one after another
    exec(compile("\n".join(blocks), rel, "exec"), namespace)


# [text](target) and ![alt](target), with an optional "title"; code spans are removed first
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")


def relative_links(text):
    text = _CODE_SPAN.sub("", _FENCE.sub("", text))
    for target in _LINK.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s), mailto and other schemes; anchors within the page
        yield target


@pytest.mark.parametrize("rel", DOCS + [r for r in RESULTS_MD if r not in DOCS])
def test_relative_links_point_to_files_in_the_repository(rel):
    here = os.path.dirname(os.path.join(ROOT, rel))
    bad = []
    for target in relative_links(_read(rel)):
        path = target.split("#", 1)[0]
        if not path:
            continue
        if path.startswith("/"):
            bad.append(f"{target} (absolute; links must be relative)")
            continue
        full = os.path.normpath(os.path.join(here, path))
        if os.path.relpath(full, ROOT).startswith(".."):
            bad.append(f"{target} (outside the repository)")
        elif not os.path.exists(full):
            bad.append(f"{target} (no such file)")
    assert not bad, f"{rel}: broken links: {bad}"


def test_link_check_finds_links():
    links = list(relative_links("see [a](docs/a.md#x), ![b](b.png \"t\"), [c](https://x.org), `[d](e)`"))
    assert links == ["docs/a.md#x", "b.png"]


# Places on the machines this project was written on; examples such as /data/ACDC
# or /tmp/syn in commands are fine.
_OUTSIDE = [
    ROOT.rstrip("/") + "/",  # this checkout's own absolute path
    "../shared",
    "/root/",
    "/home/",
    "/work/",
    "/mnt/",
    "/Users/",
]


@pytest.mark.parametrize("rel", DOCS + RESULTS_NOTES)
def test_no_references_outside_the_repository(rel):
    text = _read(rel)
    found = sorted({p for p in _OUTSIDE if p in text})
    assert not found, f"{rel} refers to paths outside the repository: {found}"


@pytest.mark.parametrize("module", ["icl_kernels.backends", "icl_kernels.nn", "icl_kernels.ops.proxy_attention"])
def test_docstring_examples(module):
    import importlib

    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module} has no docstring examples"
    assert result.failed == 0
