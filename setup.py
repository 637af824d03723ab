"""Build of icl_kernels._C: C++ CPU kernels always, CUDA kernels when possible.

Build against the torch you run (C++ ABI): ``pip install --no-build-isolation -e .``

Environment:
  ICL_BUILD_CUDA=0|1     force the CUDA kernels off / on (default: on when a CUDA
                         build of torch and a CUDA toolkit of the same major version
                         are found; no GPU needed; another major version: CPU-only
                         build with a message saying why)
  TORCH_CUDA_ARCH_LIST   GPU architectures (default "8.0;9.0+PTX": A100, H100, PTX for newer)
  CUDA_HOME              the toolkit, when it is not found by itself
  MAX_JOBS               parallel compile jobs (ninja)
  ICL_BUILD_NO_EXT=1     skip the extension (pure Python install: `torch` and `triton` backends)
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg: str) -> None:
    """Print (shown by `pip install -v`) and keep a copy in build/icl_kernels_build.log."""
    line = f"[icl_kernels build] {msg}"
    print(line, flush=True)
    try:
        os.makedirs(os.path.join(HERE, "build"), exist_ok=True)
        with open(os.path.join(HERE, "build", "icl_kernels_build.log"), "a") as fh:
            fh.write(line + "\n")
    except OSError:
        pass


def _toolkit_ok(root: str) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h")
    )


def find_cuda_home(torch_cuda: str | None) -> str | None:
    """The CUDA toolkit root. torch guesses it from `which nvcc`, which is wrong
    when nvcc on PATH is a wrapper script (as on our build machines)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and _toolkit_ok(root):
            return root
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        root = os.path.dirname(os.path.dirname(real))
        if _toolkit_ok(root):
            return root
        try:  # a wrapper script: look for the nvcc it executes
            with open(real, "r", errors="ignore") as fh:
                text = fh.read(4096)
            for path in re.findall(r"(/[^\s\"']+/bin/nvcc)\b", text):
                root = os.path.dirname(os.path.dirname(path))
                if _toolkit_ok(root):
                    return root
        except OSError:
            pass
    candidates = sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/usr/local/cuda", "/opt/cuda"]
    if torch_cuda:  # prefer the toolkit matching torch's CUDA version, then its major version
        major = torch_cuda.split(".")[0]
        candidates.sort(key=lambda p: (not p.endswith(torch_cuda), not os.path.basename(p).startswith(f"cuda-{major}.")))
    for root in candidates:
        if _toolkit_ok(root):
            return root
    return None


def toolkit_version(root: str) -> str | None:
    """The toolkit's CUDA version ("13.0"), from version.json or `nvcc --version`; None if unknown."""
    try:
        import json

        with open(os.path.join(root, "version.json")) as fh:
            v = json.load(fh)["cuda"]["version"]
        return ".".join(v.split(".")[:2])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        import subprocess

        out = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
        m = re.search(r"release (\d+\.\d+)", out)
        return m.group(1) if m else None
    except (OSError, subprocess.SubprocessError):
        return None


def wheel_cuda_include_dirs() -> list[str]:
    """Headers shipped by the nvidia-* wheels (cuBLAS, cuSPARSE, ...) that torch's CUDA headers include."""
    dirs = []
    for entry in sys.path:
        base = os.path.join(entry, "nvidia")
        if os.path.isdir(base):
            dirs += sorted(d for d in glob.glob(os.path.join(base, "**", "include"), recursive=True) if os.path.isdir(d))
    return dirs


def write_build_info(**info) -> None:
    """Records what this build compiles in icl_kernels/_build_info.py (generated,
    git-ignored; the package and tests work without it)."""
    path = os.path.join(HERE, "icl_kernels", "_build_info.py")
    lines = ['"""Written by setup.py: what the last build of icl_kernels._C compiled."""\n']
    lines += [f"{key} = {value!r}\n" for key, value in sorted(info.items())]
    try:
        with open(path, "w") as fh:
            fh.writelines(lines)
    except OSError as exc:  # a read-only source tree: the record is optional
        log(f"could not write {path}: {exc}")


def cuda_decision(want, torch_version, torch_cuda, cuda_home, toolkit, cuda_sources) -> tuple[bool, str]:
    """(build the CUDA kernels?, why) from what was found; ICL_BUILD_CUDA=1 turns a no into an error."""
    if want == "0":
        return False, "ICL_BUILD_CUDA=0"
    elif not torch_cuda:
        return False, f"torch {torch_version} is a CPU-only build"
    elif cuda_home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    elif not cuda_sources:
        return False, "no CUDA sources in csrc/cuda"
    elif (toolkit or torch_cuda).split(".")[0] != torch_cuda.split(".")[0]:
        # torch's CUDA extension check refuses a toolkit of another major version
        # (and the kernels would not load): build the CPU kernels instead of failing.
        return False, (
            f"the toolkit at {cuda_home} is CUDA {toolkit} but torch {torch_version} "
            f"was built with CUDA {torch_cuda}: major versions differ (set CUDA_HOME to a CUDA "
            f"{torch_cuda.split('.')[0]}.x toolkit to build the CUDA kernels)"
        )
    else:
        return True, f"torch {torch_version} (CUDA {torch_cuda}) and toolkit {cuda_home}"


# A symbol every C++ error message with a number in it reaches (c10::str -> ostream << long).
_LIBSTDCXX_PROBE_SYMBOL = "_ZNSo9_M_insertIlEERSoT_"


def links_libstdcxx_statically(cxx: str) -> bool | None:
    """Whether ``cxx`` puts a private copy of libstdc++ into the shared objects it
    links (True/False; None: could not tell). Seen on a toolchain in /opt/gcc
    (g++ 13.3) on an H200 machine: the copy inside _C then formats numbers with
    locale facets that belong to the process's own libstdc++ and crashed (SIGSEGV)
    in every error message with a number in it."""
    nm = shutil.which("nm")
    if nm is None or not sys.platform.startswith("linux"):
        return None
    with tempfile.TemporaryDirectory() as d:
        src, so = os.path.join(d, "probe.cpp"), os.path.join(d, "probe.so")
        with open(src, "w") as fh:
            fh.write("#include <sstream>\n#include <string>\n"
                     "std::string probe(long v) { std::ostringstream s; s << v; return s.str(); }\n")
        try:
            subprocess.run([cxx, "-shared", "-fPIC", src, "-o", so], check=True, capture_output=True, timeout=120)
            out = subprocess.run([nm, "--defined-only", so], check=True, capture_output=True, text=True,
                                 timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None  # the real build reports a broken compiler better than a probe can
    return any(line.split()[-1] == _LIBSTDCXX_PROBE_SYMBOL for line in out.splitlines() if line.strip())


def loaded_libstdcxx(maps: str = "/proc/self/maps") -> str | None:
    """Path of the libstdc++ this process runs with (torch's), from the memory map."""
    try:
        with open(maps) as fh:
            for line in fh:
                path = line.split()[-1] if line.split() else ""
                if os.path.basename(path).startswith("libstdc++.so") and os.path.isfile(path):
                    return path
    except OSError:
        pass
    return None


def libstdcxx_link_args(cxx: str) -> list[str]:
    """Linker inputs that make _C use the process's libstdc++ when ``cxx`` would
    link a private copy: that library, by path, ahead of the compiler's own
    (whatever it resolves, the static archive no longer supplies)."""
    if not links_libstdcxx_statically(cxx):
        return []
    lib = loaded_libstdcxx()
    if lib is None:
        log(f"warning: {cxx} links libstdc++ statically into shared objects and the running libstdc++ was not "
            "found; error messages of the kernels may crash (set CXX to another compiler)")
        return []
    log(f"{cxx} links libstdc++ statically into shared objects; linking {lib} (the one torch runs with) instead")
    return [lib]


def extension_modules():
    if os.environ.get("ICL_BUILD_NO_EXT", "0") == "1":
        log("ICL_BUILD_NO_EXT=1: not building the C++/CUDA extension")
        write_build_info(EXTENSION=False, CUDA=False, CUDA_REASON="ICL_BUILD_NO_EXT=1")
        return [], {}
    import torch

    torch_cuda = torch.version.cuda
    want = os.environ.get("ICL_BUILD_CUDA")
    cuda_home = find_cuda_home(torch_cuda) if torch_cuda else None
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    toolkit = toolkit_version(cuda_home) if cuda_home else None
    build_cuda, why = cuda_decision(want, torch.__version__, torch_cuda, cuda_home, toolkit, cuda_sources)
    if want == "1" and not build_cuda:
        raise SystemExit(f"[icl_kernels build] ICL_BUILD_CUDA=1 but CUDA cannot be built: {why}")
    if build_cuda:
        os.environ["CUDA_HOME"] = cuda_home  # read by cpp_extension at import
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    write_build_info(
        EXTENSION=True,
        CUDA=build_cuda,
        CUDA_REASON=why,
        CUDA_DISABLED_BY_ENV=want == "0",
        CUDA_HOME=cuda_home,
        CUDA_TOOLKIT_VERSION=toolkit,
        CUDA_TOOLKIT_MISMATCH=bool(torch_cuda and toolkit and toolkit.split(".")[0] != torch_cuda.split(".")[0]),
        CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST") if build_cuda else None,
        CUDA_SOURCES=cuda_sources,
        TORCH_VERSION=torch.__version__,
        TORCH_CUDA=torch_cuda,
    )
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -fopenmp: at::parallel_for is inline OpenMP code; without it the loops run serially.
    cxx_flags = ["-O3", "-fno-math-errno", "-fopenmp"]  # torch adds the C++ standard it needs
    link_args = ["-fopenmp"] + libstdcxx_link_args(os.environ.get("CXX", "c++"))  # cpp_extension's compiler
    log(f"torch {torch.__version__}, python {sys.version.split()[0]}, MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}")
    log(f"C++ CPU kernels: {', '.join(sources)}")
    if build_cuda:
        arch = os.environ["TORCH_CUDA_ARCH_LIST"]
        log(f"CUDA kernels: ON ({why}); TORCH_CUDA_ARCH_LIST={arch}; sources: {', '.join(cuda_sources)}")
        include_dirs = wheel_cuda_include_dirs()
        ext = CUDAExtension(
            "icl_kernels._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
            },
            extra_link_args=link_args,
        )
    else:
        log(f"CUDA kernels: OFF ({why})")
        ext = CppExtension(
            "icl_kernels._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_args,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=find_packages(include=["icl_kernels", "icl_kernels.*", "icl", "icl.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
