"""Compile every Triton kernel variant the dispatchers can launch, for a GPU target, without a GPU.

Triton's bundled ptxas compiles for any NVIDIA architecture on a machine without
one, so what only the GPU compiler rejects (a dot whose accumulator dtype the
installed Triton does not accept, shared memory beyond the device's limit,
register spills) shows up here, in CI, instead of on first contact with a GPU.

``variants()`` lists one entry per distinct compiled kernel: every dtype, eps on
and off, every subset of requested gradients, and every launch configuration the
dispatchers (``proxy_attention._gpu_config``, ``prototype_update._blocks``) can
pick, each with the loop structure it implies (channels in one chunk or several,
rows in one chunk or several).  ``compile_variant`` compiles one and reads the
resources from the compiler: registers and stack frame from the cubin
(``cuobjdump``), spilled bytes from ``ptxas -v`` where there is a stack frame,
shared memory from the kernel metadata plus the static shared memory.

Run ``python -m tools.triton_compile_report [--arch 90] [--jobs N]`` for
the table; it exits non-zero if a variant fails to compile or does not fit.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

# H100/H200 (sm_90): at most 227 KB of shared memory per block (opt-in), 255 registers per thread.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024, 86: 99 * 1024}
# Spills the report tolerates per thread (bytes of spill stores); the dispatchers aim at zero.
SPILL_TOLERANCE = 0

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64",
        torch.int32: "*i32", torch.int64: "*i64"}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


@dataclass
class Variant:
    """One compiled kernel: a jit function, its constexprs and the dtype of each pointer."""

    name: str
    kernel: str  # attribute name of the jit function in `module`
    module: str
    constexprs: Dict[str, object]
    ptrs: Dict[str, torch.dtype]  # pointer arguments not listed here take `default_ptr`
    default_ptr: torch.dtype
    num_warps: int = 4
    num_stages: int = 2
    float_args: tuple = ("eps",)
    # For the CI subset: `config` names the launch configuration, `structure` the
    # loop structure it implies; `heaviest` marks the flags that compile the most code
    # (eps on, every gradient, label checks...).
    config: str = ""
    structure: str = ""
    heaviest: bool = True


@dataclass
class Report:
    name: str
    ok: bool
    regs: Optional[int] = None
    spill_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    seconds: float = 0.0
    error: str = ""
    extra: dict = field(default_factory=dict)

    def fits(self, arch: int = 90) -> bool:
        return (self.ok and self.shared_bytes is not None and self.shared_bytes <= SMEM_LIMIT.get(arch, SMEM_LIMIT[90])
                and self.spill_bytes is not None and self.spill_bytes <= SPILL_TOLERANCE)


# ---------------------------------------------------------------- variants


def proxy_attention_variants() -> List[Variant]:
    from icl_kernels.triton import proxy_attention as tpa

    mod = tpa.__name__
    acc_ptrs = ("pmax_ptr", "psum_ptr", "pz_ptr", "lse_ptr", "D_ptr", "pdA_ptr", "pdc_ptr", "scr_ptr")
    out: List[Variant] = []
    # Shapes that reach every branch of the config table (M below/above 64, C at
    # every power of two the table distinguishes, C not a power of two).
    Ms = (16, 64, 256)
    Cs = (16, 32, 64, 96, 128, 256, 512)
    for dtype in DTYPES:
        acc_t, acc_tl, dot_tl, prec = tpa._dtypes(dtype)
        ptrs = {p: acc_t for p in acc_ptrs}
        common = dict(DOT=dot_tl, PREC=prec, ACC=acc_tl, sxn=1)
        seen_f, seen_b = set(), set()
        for M in Ms:
            for C in Cs:
                f = tpa._gpu_config(M, C, dtype, backward=False)
                ncc = -(-C // f.block_c)
                key = (f, ncc == 1)
                if key not in seen_f:
                    seen_f.add(key)
                    for eps in (True, False):
                        out.append(Variant(
                            f"pa_fwd {_SHORT[dtype]} M={M} C={C} eps={int(eps)} {_cfg(f)}", "_fwd_kernel", mod,
                            dict(common, HAS_EPS=eps, BLOCK_M=f.block_m, BLOCK_N=f.block_n, BLOCK_C=f.block_c,
                                 NUM_CC=ncc),
                            ptrs, dtype, f.num_warps, f.num_stages,
                            config=f"fwd {_cfg(f)} {ncc == 1}", structure=f"fwd cc1={ncc == 1}", heaviest=eps))
                b = tpa._gpu_config(M, C, dtype, backward=True)
                nmc, ncc = -(-M // b.block_m), -(-C // b.block_c)
                key = (b, nmc == 1, ncc == 1)
                if key in seen_b:
                    continue
                seen_b.add(key)
                for eps in (True, False):
                    for dz, gs in ((True, True), (True, False), (False, True)):
                        out.append(Variant(
                            f"pa_bwd {_SHORT[dtype]} M={M} C={C} eps={int(eps)} dZ={int(dz)} dS={int(gs)} {_cfg(b)}",
                            "_bwd_kernel", mod,
                            dict(common, HAS_EPS=eps, HAS_DZ=dz, HAS_GS=gs, BLOCK_M=b.block_m, BLOCK_N=b.block_n,
                                 BLOCK_C=b.block_c, NUM_MC=nmc, NUM_CC=ncc, DA_IN_REGS=nmc == 1 and ncc == 1, sdn=1),
                            ptrs, dtype, b.num_warps, b.num_stages,
                            config=f"bwd {_cfg(b)} {nmc == 1} {ncc == 1}",
                            structure=f"bwd mc1={nmc == 1} cc1={ncc == 1}", heaviest=eps and dz and gs))
        out.append(Variant(f"pa_fwd_combine {_SHORT[dtype]}", "_fwd_combine_kernel", mod,
                           dict(BLOCK_M=16, BLOCK_C=128, ACC=acc_tl), ptrs, dtype, 4, 2))
        out.append(Variant(f"pa_reduce_splits {_SHORT[dtype]}", "_reduce_splits_kernel", mod,
                           dict(BLOCK=1024, ACC=acc_tl), {}, acc_t, 4, 2))
    return out


def prototype_update_variants() -> List[Variant]:
    from icl_kernels.triton import prototype_update as tpu

    mod = tpu.__name__
    out: List[Variant] = []
    # Every K and C the block table distinguishes (powers of two and the caps).
    Ks = (2, 4, 21, 64, 150, 1000)
    Cs = (16, 32, 64, 256)
    for dtype in DTYPES:
        acc_t = tpu._acc_dtype(dtype)
        acc_tl = tpu._tl_acc(dtype)
        seen = set()
        for K in Ks:
            for C in Cs:
                for use_probs, has_w in ((False, False), (False, True), (True, False)):
                    fwd = tpu._forward_blocks(K, C, dtype, use_probs, has_w)
                    low = dtype in (torch.float16, torch.bfloat16) and (use_probs or not has_w)
                    key = ("f", fwd, use_probs, has_w)
                    if key not in seen:
                        seen.add(key)
                        for det in (True, False):
                            for check in ((True, False) if not use_probs else (False,)):
                                out.append(Variant(
                                    f"pu_sums {_SHORT[dtype]} K={K} C={C} probs={int(use_probs)} w={int(has_w)} "
                                    f"det={int(det)} check={int(check)} {fwd}",
                                    "_class_sums_kernel", mod,
                                    dict(USE_PROBS=use_probs, HAS_W=has_w, ATOMIC=not det, CHECK=check,
                                         LOW_PRECISION_DOT=low, ACC=acc_tl, BLOCK_K=fwd.block_k,
                                         BLOCK_C=fwd.block_c, BLOCK_N=fwd.block_n, sfn=1),
                                    {"lab_ptr": torch.int64, "w_ptr": acc_t, "out_ptr": acc_t, "tot_ptr": acc_t,
                                     "bad_ptr": torch.int32}, dtype, fwd.num_warps, fwd.num_stages,
                                    config=f"sums {fwd} {use_probs} {has_w}",
                                    structure=f"sums probs={use_probs} w={has_w}",
                                    heaviest=det and (check or use_probs)))
                bwd_p = tpu._probs_backward_blocks(K, C, dtype)
                key = ("p", bwd_p, bwd_p.num_kb(K) == 1)
                if key not in seen:
                    seen.add(key)
                    for nf, np_ in ((True, True), (True, False), (False, True)):
                        out.append(Variant(
                            f"pu_probs_bwd {_SHORT[dtype]} K={K} C={C} dF={int(nf)} dP={int(np_)} {bwd_p}",
                            "_probs_backward_kernel", mod,
                            dict(NEED_F=nf, NEED_P=np_, ACC=acc_tl, BLOCK_K=bwd_p.block_k, BLOCK_C=bwd_p.block_c,
                                 BLOCK_N=bwd_p.block_n, NUM_KB=bwd_p.num_kb(K), sfn=1, spn=1, sgn=1, sqn=1),
                            {"g_ptr": acc_t, "gt_ptr": acc_t}, dtype, bwd_p.num_warps, bwd_p.num_stages,
                            config=f"probs_bwd {bwd_p} {bwd_p.num_kb(K) == 1}",
                            structure=f"probs_bwd kb1={bwd_p.num_kb(K) == 1}", heaviest=nf and np_))
        bwd_l = tpu._labels_backward_blocks(dtype)
        for has_w in (True, False):
            for nf, nw in ((True, True), (True, False), (False, True)):
                out.append(Variant(
                    f"pu_labels_bwd {_SHORT[dtype]} w={int(has_w)} dF={int(nf)} dW={int(nw)} {bwd_l}",
                    "_labels_backward_kernel", mod,
                    dict(HAS_W=has_w, NEED_F=nf, NEED_W=nw, ACC=acc_tl, BLOCK_C=bwd_l.block_c,
                         BLOCK_N=bwd_l.block_n, sfn=1, sgn=1),
                    {"g_ptr": acc_t, "gt_ptr": acc_t, "lab_ptr": torch.int64, "w_ptr": acc_t, "gw_ptr": acc_t},
                    dtype, bwd_l.num_warps, bwd_l.num_stages))
        out.append(Variant(f"pu_sum_partials {_SHORT[dtype]}", "_sum_partials_kernel", mod,
                           dict(BLOCK=256), {}, acc_t, 4, 2))
    return out


def variants() -> List[Variant]:
    return proxy_attention_variants() + prototype_update_variants()


_FLAGS = ("HAS_EPS", "HAS_DZ", "HAS_GS", "ATOMIC", "CHECK", "NEED_F", "NEED_P", "NEED_W")


def ci_variants(vs: Optional[List[Variant]] = None) -> List[Variant]:
    """The covering subset CI compiles: every launch configuration with its heaviest
    flags, and, per kernel and dtype, every other flag combination (eps off, each
    subset of gradients, atomic or not, label checks off) once, on the first
    configuration where it occurs."""
    vs = variants() if vs is None else vs
    first: Dict[tuple, str] = {}
    covered = set()
    out = []
    for v in vs:
        group = (v.kernel, v.name.split()[1] if len(v.name.split()) > 1 else "")
        first.setdefault(group + (v.structure,), v.config)
        flags = group + (v.structure,) + tuple(v.constexprs.get(f) for f in _FLAGS)
        if v.heaviest or (v.config == first[group + (v.structure,)] and flags not in covered
                          and group + tuple(v.constexprs.get(f) for f in _FLAGS) not in covered):
            out.append(v)
            covered.add(flags)
            covered.add(group + tuple(v.constexprs.get(f) for f in _FLAGS))
    return out


def _cfg(cfg) -> str:
    return f"[m{cfg.block_m} n{cfg.block_n} c{cfg.block_c} w{cfg.num_warps}]"


# ---------------------------------------------------------------- compiling


def _tool(name: str) -> str:
    """ptxas / cuobjdump: Triton's bundled copies (TRITON_PTXAS_PATH overrides ptxas)."""
    import triton

    if name == "ptxas" and os.environ.get("TRITON_PTXAS_PATH"):
        return os.environ["TRITON_PTXAS_PATH"]
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _run(argv: List[str]) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    return r.stdout + r.stderr


def _signature(fn, v: Variant) -> Dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in v.constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = _PTR[v.ptrs.get(name, v.default_ptr)]
        else:
            sig[name] = "fp32" if name in v.float_args else "i32"
    return sig


def compile_variant(v: Variant, arch: int = 90) -> Report:
    """Compile one variant for sm_<arch>; registers and spills from ptxas -v, shared memory from Triton."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    fn = getattr(importlib.import_module(v.module), v.kernel)
    fn = getattr(fn, "fn", fn) if not hasattr(fn, "arg_names") else fn
    try:
        src = ASTSource(fn=fn, signature=_signature(fn, v), constexprs=dict(v.constexprs))
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": v.num_warps, "num_stages": v.num_stages})
    except Exception as e:  # noqa: BLE001 - reported, the caller decides
        msg = f"{type(e).__name__}: {e}"
        return Report(v.name, False, seconds=time.perf_counter() - t0, error=msg[-3000:])
    shared = int(getattr(k.metadata, "shared", 0))
    regs = spills = None
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as fh:
            fh.write(k.asm["cubin"])
        # cuobjdump reads registers, stack frame and static shared memory from the
        # cubin Triton built (milliseconds).  These kernels have no local arrays and
        # no calls, so a stack frame means spills: only then ptxas runs again (-v)
        # to report the spilled bytes.
        text = _run([_tool("cuobjdump"), "--dump-resource-usage", cubin])
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", text)
        if m:
            regs, stack, static_smem = int(m.group(1)), int(m.group(2)), int(m.group(3))
            shared += static_smem
            spills = 0
            if stack:
                ptx = os.path.join(d, "k.ptx")
                with open(ptx, "w") as fh:
                    fh.write(k.asm["ptx"])
                gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
                out = _run([_tool("ptxas"), "-v", f"--gpu-name={gpu}", ptx, "-o", os.path.join(d, "v.cubin")])
                m = re.search(r"(\d+) bytes spill stores", out)
                spills = int(m.group(1)) if m else stack
                spills = max(spills, 1)
    return Report(v.name, True, regs, spills, shared, time.perf_counter() - t0)


def _compile_by_index(args):
    i, arch = args
    return compile_variant(variants()[i], arch)


def compile_all(vs: Optional[List[Variant]] = None, arch: int = 90, jobs: int = 1,
                pattern: Optional[str] = None, progress=None) -> List[Report]:
    """Compile the variants (all by default, or those of `vs`), those whose name matches `pattern`;
    with jobs > 1 in that many processes."""
    allv = variants()
    idx = [i for i, v in enumerate(allv) if pattern is None or re.search(pattern, v.name)]
    if vs is not None:
        names = {v.name for v in vs}
        idx = [i for i in idx if allv[i].name in names]
    out = []
    if jobs <= 1:
        for i in idx:
            out.append(compile_variant(allv[i], arch))
            if progress:
                progress(out[-1])
        return out
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        for r in ex.map(_compile_by_index, [(i, arch) for i in idx]):
            out.append(r)
            if progress:
                progress(r)
    return out


HEADER = f"{'variant':<100} {'regs':>4} {'spill':>6} {'smem KB':>8} {'s':>5}"


def format_report(r: Report, arch: int = 90) -> str:
    if not r.ok:
        return f"{r.name:<100} FAILED: {r.error.splitlines()[-1] if r.error else ''}"
    flag = "" if r.fits(arch) else "  <-- does not fit"
    return f"{r.name:<100} {r.regs!s:>4} {r.spill_bytes!s:>6} {r.shared_bytes / 1024:8.1f} {r.seconds:5.1f}{flag}"


def format_reports(reports: List[Report], arch: int = 90) -> str:
    return "\n".join([HEADER] + [format_report(r, arch) for r in reports])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100/H200)")
    ap.add_argument("--jobs", type=int, default=1, help="compile processes (default 1)")
    ap.add_argument("--filter", default=None, help="regular expression on the variant names")
    ap.add_argument("--list", action="store_true", help="list the variants, compile nothing")
    ap.add_argument("--ci", action="store_true", help="only the covering subset CI compiles (see ci_variants)")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("triton_compile_report: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    chosen = ci_variants() if a.ci else variants()
    if a.list:
        for v in chosen:
            if a.filter is None or re.search(a.filter, v.name):
                print(v.name)
        return 0
    import triton

    t0 = time.perf_counter()
    print(HEADER, flush=True)
    reports = compile_all(chosen, arch=a.arch, jobs=a.jobs, pattern=a.filter,
                          progress=lambda r: print(format_report(r, a.arch), flush=True))
    bad = [r for r in reports if not r.fits(a.arch)]
    print(f"triton {triton.__version__}, sm_{a.arch}: {len(reports)} variants, {len(bad)} failing or not fitting, "
          f"{time.perf_counter() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
