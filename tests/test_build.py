"""What the build of icl_kernels._C produced: CPU kernels always, CUDA kernels
whenever a CUDA build of torch and a CUDA toolkit were there (no GPU needed),
and real device code inside the shared object when it claims CUDA kernels."""
from __future__ import annotations

import glob
import os
import shutil
import struct
import subprocess

import pytest
import torch

from icl_kernels import _extension, available_backends

OPS = ("_proxy_attention_forward", "_proxy_attention_backward")


def build_info():
    """The record setup.py writes (icl_kernels/_build_info.py), or None."""
    try:
        from icl_kernels import _build_info
    except ImportError:
        return None
    return _build_info


def require_extension():
    info = build_info()
    if info is not None and not getattr(info, "EXTENSION", True):
        pytest.skip("built with ICL_BUILD_NO_EXT=1 (no compiled extension)")
    assert _extension.is_loaded(), _extension.load_error_message()


def has_cuda_kernel(op: str) -> bool:
    return _extension.has_kernel(op, "CUDA")


def toolkit_present() -> bool:
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    roots += sorted(glob.glob("/usr/local/cuda*")) + ["/opt/cuda"]
    if any(r and os.path.isfile(os.path.join(r, "bin", "nvcc")) for r in roots):
        return True
    return shutil.which("nvcc") is not None


def elf_sections(path: str) -> dict:
    """Section name -> size of a 64-bit little-endian ELF file (what our builds make)."""
    with open(path, "rb") as fh:
        data = fh.read()
    assert data[:4] == b"\x7fELF", f"{path} is not an ELF file"
    assert data[4] == 2 and data[5] == 1, "expected a 64-bit little-endian ELF file"
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i):
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, str_off, _ = header(shstrndx)
    sections = {}
    for i in range(shnum):
        name_off, _, size = header(i)
        end = data.index(b"\0", str_off + name_off)
        sections[data[str_off + name_off : end].decode()] = size
    return sections


FATBIN_MAGIC = 0xBA55ED50


def fatbin_entries(path: str):
    """(kind, sm) of every entry of the fat binaries in .nv_fatbin, kind 'ELF' or
    'PTX', read from the container headers (layout as publicly described: a
    16-byte container header, then entries whose header holds the kind at
    offset 0, its own size at 4, the payload size at 8 and the SM at 28).
    None when the section cannot be read that way."""
    with open(path, "rb") as fh:
        data = fh.read()
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    str_off = headers[shstrndx][4]
    for name_off, _type, _flags, _addr, offset, size in headers:
        if data[str_off + name_off : data.index(b"\0", str_off + name_off)] == b".nv_fatbin":
            break
    else:
        return None
    entries, p, end = [], offset, offset + size
    while p + 16 <= end:
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", data, p)
        if magic != FATBIN_MAGIC:
            p += 8  # containers are 8-byte aligned
            continue
        q, stop = p + header_size, p + header_size + fat_size
        while q + 32 <= stop:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, q)
            sm = struct.unpack_from("<I", data, q + 28)[0]
            if kind not in (1, 2) or entry_header < 32:
                return None
            entries.append(("PTX" if kind == 1 else "ELF", sm))
            q += entry_header + payload
        p = stop
    return entries or None


def shared_object() -> str:
    from icl_kernels import _C  # type: ignore[attr-defined]

    return _C.__file__


def test_extension_loads_with_cpu_kernels():
    require_extension()
    for op in OPS:
        assert _extension.has_kernel(op, "CPU"), op


def test_cuda_kernels_registered_for_both_ops_or_neither():
    require_extension()
    assert has_cuda_kernel(OPS[0]) == has_cuda_kernel(OPS[1])


def test_build_record_matches_the_loaded_extension():
    require_extension()
    info = build_info()
    if info is None:
        pytest.skip("no build record (icl_kernels/_build_info.py is written by setup.py)")
    assert bool(info.CUDA) == has_cuda_kernel(OPS[0]), (
        f"the build record says CUDA={info.CUDA} but the loaded extension "
        f"{'has' if has_cuda_kernel(OPS[0]) else 'lacks'} CUDA kernels: stale build?"
    )


def test_cuda_built_whenever_possible():
    """A CUDA build of torch plus a toolkit must give CUDA kernels, GPU or not."""
    require_extension()
    info = build_info()
    if info is not None and getattr(info, "CUDA_DISABLED_BY_ENV", False):
        pytest.skip("built with ICL_BUILD_CUDA=0")
    if os.environ.get("ICL_BUILD_CUDA") == "0":
        pytest.skip("ICL_BUILD_CUDA=0")
    if not torch.version.cuda:
        pytest.skip(f"torch {torch.__version__} is a CPU-only build")
    if not toolkit_present():
        pytest.skip("no CUDA toolkit on this machine")
    if info is not None and getattr(info, "CUDA_TOOLKIT_MISMATCH", False) and os.environ.get("ICL_EXPECT_CUDA") != "1":
        pytest.skip(f"CPU-only build by design: {info.CUDA_REASON}")
    reason = f" (setup.py said: {info.CUDA_REASON})" if info is not None else ""
    assert has_cuda_kernel(OPS[0]), "torch has CUDA and a toolkit exists, but no CUDA kernels were built" + reason


def test_shared_object_holds_device_code():
    require_extension()
    if not has_cuda_kernel(OPS[0]):
        pytest.skip("built without CUDA kernels")
    path = shared_object()
    sections = elf_sections(path)
    assert sections.get(".nv_fatbin", 0) > 0, f"no .nv_fatbin section in {path}: {sorted(sections)}"
    with open(path, "rb") as fh:
        data = fh.read()
    for kernel in (
        b"proxy_attention_forward_partial_kernel",
        b"proxy_attention_forward_combine_kernel",
        b"proxy_attention_backward_kernel",
        b"proxy_attention_reduce_splits_kernel",
    ):
        assert kernel in data, f"{kernel.decode()} is not in {path}"


def test_device_code_covers_the_requested_architectures():
    require_extension()
    if not has_cuda_kernel(OPS[0]):
        pytest.skip("built without CUDA kernels")
    info = build_info()
    if info is None or not info.CUDA_ARCH_LIST:
        pytest.skip("no build record of the architectures")
    path = shared_object()
    arches = [a for a in info.CUDA_ARCH_LIST.replace(",", ";").replace(" ", ";").split(";") if a]
    tool = shutil.which("cuobjdump")
    if tool is None and info.CUDA_HOME:
        candidate = os.path.join(info.CUDA_HOME, "bin", "cuobjdump")
        tool = candidate if os.path.isfile(candidate) else None
    if tool is not None:
        elves = subprocess.run([tool, "--list-elf", path], capture_output=True, text=True, check=True).stdout
        ptx = subprocess.run([tool, "--list-ptx", path], capture_output=True, text=True, check=True).stdout
        for arch in arches:
            sm = arch.replace("+PTX", "").replace(".", "")
            assert f"sm_{sm}" in elves, f"no sm_{sm} cubin in {path}:\n{elves}"
            if arch.endswith("+PTX"):
                assert f"sm_{sm}" in ptx, f"no PTX for compute_{sm} in {path}:\n{ptx}"
        return
    entries = fatbin_entries(path)
    if entries is None:
        pytest.skip("no cuobjdump, and the fat binary's layout is not the one this test reads")
    for arch in arches:
        sm = int(arch.replace("+PTX", "").replace(".", ""))
        assert ("ELF", sm) in entries, f"no sm_{sm} cubin in {path}: {entries}"
        if arch.endswith("+PTX"):
            assert ("PTX", sm) in entries, f"no PTX for compute_{sm} in {path}: {entries}"


def test_cuda_backend_reports_why_it_cannot_run():
    require_extension()
    reason = available_backends(device="cuda")["cuda"]
    if has_cuda_kernel(OPS[0]) and torch.cuda.is_available():
        assert reason is None
    elif has_cuda_kernel(OPS[0]):
        assert "no GPU" in reason
    else:
        assert "without CUDA kernels" in reason


def _setup_functions():
    """setup.py's helper functions, without running setup()."""
    import ast

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    with open(path) as fh:
        tree = ast.parse(fh.read())
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef))
            or (isinstance(n, ast.Assign)
                and all(isinstance(t, ast.Name) and t.id in ("HERE", "_LIBSTDCXX_PROBE_SYMBOL") for t in n.targets))]
    ns = {"__file__": path}
    exec(compile(ast.Module(body=keep, type_ignores=[]), path, "exec"), ns)
    return ns


def test_setup_falls_back_to_cpu_on_a_toolkit_of_another_major_version(tmp_path):
    ns = _setup_functions()
    root = tmp_path / "cuda-12.4"
    root.mkdir()
    (root / "version.json").write_text('{"cuda": {"name": "CUDA SDK", "version": "12.4.1"}}')
    assert ns["toolkit_version"](str(root)) == "12.4"
    decide = ns["cuda_decision"]
    ok, why = decide(None, "2.11.0", "13.0", str(root), "12.4", ["csrc/cuda/x.cu"])
    assert not ok and "major versions differ" in why and "12.4" in why and "13.0" in why
    ok, why = decide(None, "2.11.0", "13.0", str(root), "13.1", ["csrc/cuda/x.cu"])
    assert ok, why
    ok, why = decide(None, "2.11.0", "13.0", str(root), None, ["csrc/cuda/x.cu"])  # version unknown: try
    assert ok, why
    ok, why = decide("0", "2.11.0", "13.0", str(root), "13.0", ["csrc/cuda/x.cu"])
    assert not ok and why == "ICL_BUILD_CUDA=0"


def _defined_symbols(path):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm")
    out = subprocess.run([nm, "--defined-only", path], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


@pytest.mark.skipif(not os.sys.platform.startswith("linux"), reason="ELF shared objects")
def test_extension_uses_the_process_libstdcxx():
    """No private libstdc++ inside _C: its ostream code would use locale facets of
    the process's libstdc++ and crash in error messages with numbers (seen on a GPU
    machine whose g++ linked libstdc++ statically; setup.py now links around it)."""
    require_extension()
    ns = _setup_functions()
    assert ns["_LIBSTDCXX_PROBE_SYMBOL"] not in _defined_symbols(shared_object())
    with pytest.raises(ValueError, match="A has width C=9 but x has C=8"):  # a message with numbers
        torch.ops.icl_kernels._proxy_attention_forward(torch.randn(1, 10, 8), torch.randn(1, 2, 9),
                                                       torch.randn(1, 2), None)


@pytest.mark.skipif(shutil.which("g++") is None or not os.sys.platform.startswith("linux"), reason="needs g++ (ELF)")
def test_setup_links_around_a_static_libstdcxx(tmp_path):
    ns = _setup_functions()
    static_gxx = tmp_path / "g++-static"
    static_gxx.write_text('#!/bin/sh\nexec g++ "$@" -static-libstdc++\n')
    static_gxx.chmod(0o755)
    if ns["links_libstdcxx_statically"]("g++") is not False:
        pytest.skip("this machine's g++ does not link libstdc++ as a shared library")
    assert ns["links_libstdcxx_statically"](str(static_gxx)) is True
    lib = ns["loaded_libstdcxx"]()
    assert lib is not None and os.path.basename(lib).startswith("libstdc++.so")
    assert ns["libstdcxx_link_args"](str(static_gxx)) == [lib]
    assert ns["libstdcxx_link_args"]("g++") == []
    # the remedy: with that library ahead of the compiler's, no private copy is linked
    src, so = tmp_path / "p.cpp", tmp_path / "p.so"
    src.write_text("#include <sstream>\n#include <string>\n"
                   "std::string probe(long v) { std::ostringstream s; s << v; return s.str(); }\n")
    subprocess.run([str(static_gxx), "-shared", "-fPIC", str(src), lib, "-o", str(so)], check=True)
    assert ns["_LIBSTDCXX_PROBE_SYMBOL"] not in _defined_symbols(str(so))
