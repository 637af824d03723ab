"""The shape of the code base: imports run one way, registries feed the command line,
importing the library leaves the process alone."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("icl", "icl_kernels")


def _modules():
    """{dotted module name: path} of every module in the runtime packages."""
    mods = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                mods[".".join(rel)] = os.path.join(dirpath, f)
    return mods


def import_graph():
    """module -> modules it imports (module level and inside functions alike), within the packages."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        with open(path) as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base[:len(base) - (node.level - 1)]
                    src = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [src] + [f"{src}.{a.name}" for a in node.names]
            for t in targets:
                if t in mods and t != mod:
                    graph[mod].add(t)
    # importing a.b.c runs a and a.b first: those edges are not cycles of the code's making
    for mod in graph:
        graph[mod] = {t for t in graph[mod] if not mod.startswith(t + ".")}
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "icl.models.registry" in graph and graph["icl.models.attach"]  # the graph is the real one
    assert cycles(graph) == []


# The one runtime module allowed to reach tools/: the deprecated old name of the compile report,
# which forwards there (from a checkout) with a DeprecationWarning.
TOOLS_FORWARDERS = {os.path.join("icl_kernels", "triton", "compile_report.py")}


def test_imports_run_one_way():
    """icl_kernels never imports icl; neither runtime package imports the benches, nor tools
    (but for the deprecated forwarder)."""
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("icl_kernels"):
            assert not any(d == "icl" or d.startswith("icl.") for d in deps), (mod, deps)
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    text = open(os.path.join(dirpath, f)).read()
                    assert "import benches" not in text and "from benches" not in text, f
                    if os.path.relpath(os.path.join(dirpath, f), ROOT) not in TOOLS_FORWARDERS:
                        assert "from tools" not in text and "import tools" not in text, f


def test_import_icl_leaves_the_environment_alone():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import os, sys, icl, icl.train, icl.cli, icl_kernels; icl.build_model; "
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"


def test_command_line_sets_passive_waiting_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import sys, os, icl.cli\n"
            "loaded = 'torch' in sys.modules\n"
            "try:\n    icl.cli.main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(loaded, os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False PASSIVE"  # torch not loaded before main() set it


def test_train_flags_come_from_the_schema_and_registries(capsys):
    from icl.cli import build_parser
    from icl.config import TrainConfig
    from icl.methods import METHODS
    from icl_kernels.backends import backend_names

    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    train = sub.choices["train"]
    flags = {a.dest: a for a in train._actions}
    for name, spec in TrainConfig.options():
        assert (name in flags) == (spec.flag is not None), name
    assert tuple(flags["method"].choices) == tuple(METHODS)
    assert tuple(flags["backend"].choices) == tuple(backend_names())


def test_a_registered_method_appears_in_the_help(monkeypatch):
    """No command-line edit: a method registered in METHODS is a --method choice and passes the checks."""
    from icl.cli import build_parser
    from icl.methods import METHODS, Supervised

    class Mine(Supervised):
        name = "mine"

    monkeypatch.setitem(METHODS, "mine", Mine)
    train = next(a for a in build_parser()._actions if isinstance(getattr(a, "choices", None), dict)).choices["train"]
    assert "mine" in next(a for a in train._actions if a.dest == "method").choices
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--method", "theirs"])


def test_docs_option_table_names_every_flag():
    """docs/training.md's table of options is written by hand: it must keep up with the schema."""
    from icl.config import TrainConfig

    with open(os.path.join(ROOT, "docs", "training.md")) as fh:
        text = fh.read()
    for name, spec in TrainConfig.options():
        if spec.flag is None:
            assert f"`{name}`" in text, f"config-only option {name} is not mentioned in docs/training.md"
        else:
            flag = spec.flag or "--" + name.replace("_", "-")
            assert f"`{flag}`" in text, f"{flag} is not in docs/training.md's table of options"


def test_old_compile_report_name_forwards_with_a_warning():
    import importlib
    import warnings

    sys.modules.pop("icl_kernels.triton.compile_report", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("icl_kernels.triton.compile_report")
    assert any(issubclass(w.category, DeprecationWarning) and "tools.triton_compile_report" in str(w.message)
               for w in caught)
    from tools import triton_compile_report as new

    assert old.ci_variants is new.ci_variants
