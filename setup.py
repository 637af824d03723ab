"""Build of icl_kernels._C: C++ CPU kernels always, CUDA kernels when possible.

Build against the torch you run (C++ ABI): ``pip install --no-build-isolation -e .``

Environment:
  ICL_BUILD_CUDA=0|1     force the CUDA kernels off / on (default: on when a CUDA
                         build of torch and a CUDA toolkit are found; no GPU needed)
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
import sys

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
    if torch_cuda:  # prefer the toolkit matching torch's CUDA version
        candidates.sort(key=lambda p: not p.endswith(torch_cuda))
    for root in candidates:
        if _toolkit_ok(root):
            return root
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
    if want == "0":
        build_cuda, why = False, "ICL_BUILD_CUDA=0"
    elif not torch_cuda:
        build_cuda, why = False, f"torch {torch.__version__} is a CPU-only build"
    elif cuda_home is None:
        build_cuda, why = False, "no CUDA toolkit found (set CUDA_HOME)"
    elif not cuda_sources:
        build_cuda, why = False, "no CUDA sources in csrc/cuda"
    else:
        build_cuda, why = True, f"torch {torch.__version__} (CUDA {torch_cuda}) and toolkit {cuda_home}"
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
        CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST") if build_cuda else None,
        CUDA_SOURCES=cuda_sources,
        TORCH_VERSION=torch.__version__,
        TORCH_CUDA=torch_cuda,
    )
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -fopenmp: at::parallel_for is inline OpenMP code; without it the loops run serially.
    cxx_flags = ["-O3", "-fno-math-errno", "-fopenmp"]  # torch adds the C++ standard it needs
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
            extra_link_args=["-fopenmp"],
        )
    else:
        log(f"CUDA kernels: OFF ({why})")
        ext = CppExtension(
            "icl_kernels._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=find_packages(include=["icl_kernels", "icl_kernels.*", "icl", "icl.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
