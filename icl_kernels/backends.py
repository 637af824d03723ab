"""Backend registry and selection.

A backend is a named set of kernels, one forward and one backward function per
op, plus a rule saying when it can run.  Choosing one, in order of precedence:

1. the ``backend=`` argument of the op or module,
2. the environment variable ``ICL_KERNELS_BACKEND`` (read at every call),
3. ``auto``: the first backend in the device's preference order that can run
   the op for the inputs' dtype (the `cpu` proxy attention takes float32/64).

A backend asked for by name that cannot run raises :class:`BackendUnavailableError`
saying why.  Adding a backend means writing its module (functions named
``<op>_forward`` / ``<op>_backward``) and one ``register_backend`` line below.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from . import _extension, auto

ENV_VAR = "ICL_KERNELS_BACKEND"
AUTO = "auto"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op on these tensors; the message says why."""


@dataclass
class Backend:
    """A set of kernels.

    name: what users pass as ``backend=``.
    module: import path of the module holding ``<op>_forward`` / ``<op>_backward``
        (imported when first needed), or an object holding them (a module, a
        namespace: kernels registered from a script).
    device_types: device types it runs on (None: any device).
    check: optional extra rule, ``check(op, device) -> reason or None``.
    """

    name: str
    module: Union[str, object]
    device_types: Optional[Tuple[str, ...]] = None
    check: Optional[Callable[[str, torch.device], Optional[str]]] = None
    _module_cache: Dict[str, object] = field(default_factory=dict, repr=False)

    def unavailable_reason(self, op: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
        """None when the backend can run ``op`` on ``device`` (for inputs of ``dtype``,
        when given), else a sentence saying why not."""
        if self.device_types is not None and device.type not in self.device_types:
            return (
                f"it runs on {' or '.join(self.device_types)} tensors and these are on {device.type}"
            )
        supported = _DTYPES.get((self.name, op))
        if dtype is not None and supported is not None and dtype not in supported:
            names = ", ".join(str(d).replace("torch.", "") for d in supported)
            return f"its {op} kernels take {names} inputs, not {str(dtype).replace('torch.', '')}"
        if self.check is not None:
            reason = self.check(op, device)
            if reason is not None:
                return reason
        try:
            mod = self._load()
        except ImportError as exc:
            return f"its module {self.module} failed to import ({exc})"
        if not hasattr(mod, f"{op}_forward"):
            return f"it has no kernels for the op {op!r}"
        return None

    def _load(self):
        if not isinstance(self.module, str):
            return self.module
        if "mod" not in self._module_cache:
            self._module_cache["mod"] = importlib.import_module(self.module)
        return self._module_cache["mod"]

    def kernels(self, op: str) -> Tuple[Callable, Callable]:
        mod = self._load()
        return getattr(mod, f"{op}_forward"), getattr(mod, f"{op}_backward")


_REGISTRY: Dict[str, Backend] = {}
# Input dtypes a backend's kernels take, per op (absent: any floating dtype).
_DTYPES: Dict[Tuple[str, str], Tuple[torch.dtype, ...]] = {
    ("cpu", "proxy_attention"): (torch.float32, torch.float64),
}


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def backend_names() -> Tuple[str, ...]:
    """Every accepted value of ``backend=``, ``auto`` included."""
    return (AUTO,) + tuple(_REGISTRY)


# The raw compiled op whose kernel tells that the extension implements an op
# (default ``_<op>_forward``; an op served by several raw kernels names one).
_COMPILED_PROBE: Dict[str, str] = {"prototype_update": "_prototype_update_labels_forward"}


def _check_compiled(dispatch_key: str) -> Callable[[str, torch.device], Optional[str]]:
    def check(op: str, device: torch.device) -> Optional[str]:
        if not _extension.is_loaded():
            return _extension.load_error_message()
        if not _extension.has_kernel(_COMPILED_PROBE.get(op, f"_{op}_forward"), dispatch_key):
            if dispatch_key == "CUDA":
                return (
                    "the extension was built without CUDA kernels (no CUDA toolkit or a CPU-only "
                    "torch at build time, or ICL_BUILD_CUDA=0); rebuild with a CUDA toolkit"
                )
            return f"the extension has no {dispatch_key} kernel for {op!r}"
        if dispatch_key == "CUDA":
            if not torch.cuda.is_available():
                return "no GPU is visible (torch.cuda.is_available() is False)"
            return missing_kernel_image(device)
        return None

    return check


def _built_arch_list() -> Optional[str]:
    try:
        from . import _build_info  # written by setup.py
    except ImportError:
        return None
    return getattr(_build_info, "CUDA_ARCH_LIST", None)


def missing_kernel_image(device: torch.device, arch_list: Optional[str] = None) -> Optional[str]:
    """A reason when the compiled CUDA code cannot run on ``device``'s GPU, else None.

    A cubin built for sm_XY runs on GPUs of the same major version and minor >= Y;
    PTX for compute_XY is compiled by the driver for any GPU >= XY.
    """
    arch_list = arch_list if arch_list is not None else _built_arch_list()
    if not arch_list:
        return None  # unknown build: let the launch decide
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    entries = [a.strip() for a in arch_list.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    for entry in entries:
        ptx = entry.endswith("+PTX")
        try:
            emaj, emin = (int(v) for v in entry.replace("+PTX", "").split(".")[:2])
        except ValueError:
            return None  # an arch name we do not parse (e.g. "Hopper"): do not guess
        if (emaj == major and emin <= minor) or (ptx and (emaj, emin) <= (major, minor)):
            return None
    return (f"no kernel image for this GPU (sm_{major}{minor}); the extension was built for "
            f"TORCH_CUDA_ARCH_LIST={arch_list!r}: rebuild with that GPU's architecture in the list")


def _check_triton(op: str, device: torch.device) -> Optional[str]:
    from . import triton as triton_pkg

    return triton_pkg.unavailable_reason(device)


register_backend(Backend("triton", "icl_kernels.triton", None, _check_triton))
register_backend(Backend("cuda", "icl_kernels._compiled", ("cuda",), _check_compiled("CUDA")))
register_backend(Backend("cpu", "icl_kernels._compiled", ("cpu",), _check_compiled("CPU")))
register_backend(Backend("torch", "icl_kernels.reference"))


def requested_name(backend: Optional[str]) -> str:
    """The backend name in force for a call: the argument, else the environment, else auto."""
    source = "backend"
    if backend is None:
        backend = os.environ.get(ENV_VAR) or AUTO
        source = f"the environment variable {ENV_VAR}"
    if not isinstance(backend, str) or backend.lower() not in backend_names():
        raise ValueError(
            f"{source} must be one of {', '.join(backend_names())}; got {backend!r}"
        )
    return backend.lower()


def resolve(op: str, name: str, device: torch.device, auto_order: Optional[Sequence[str]] = None,
            dtype: Optional[torch.dtype] = None) -> Backend:
    """The backend that runs ``op`` on ``device`` (inputs of ``dtype``) for the requested ``name``.

    A pure function of its arguments and of what is installed, so calling it
    again in the backward gives the forward's backend.
    """
    if name == AUTO:
        order = auto_order if auto_order is not None else auto.op_order(device.type)
        skipped = {}
        for candidate in order:
            backend = _REGISTRY[candidate]
            reason = backend.unavailable_reason(op, device, dtype)
            if reason is None:
                _warn_if_no_kernel_image(skipped, backend.name)
                return backend
            skipped[candidate] = reason
        return _REGISTRY["torch"]
    backend = _REGISTRY[name]
    reason = backend.unavailable_reason(op, device, dtype)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run {op} on {device}: {reason}")
    return backend


_warned_no_image = False


def _warn_if_no_kernel_image(skipped: Dict[str, str], chosen: str) -> None:
    """`auto` passing over compiled CUDA kernels that cannot run on this GPU says so once."""
    global _warned_no_image
    reason = skipped.get("cuda", "")
    if reason.startswith("no kernel image") and not _warned_no_image:
        _warned_no_image = True
        warnings.warn(f"icl_kernels: the cuda backend has {reason}; using the {chosen} backend instead", stacklevel=4)


def available_backends(op: str = "proxy_attention", device: Optional[torch.device | str] = None,
                       dtype: Optional[torch.dtype] = None) -> Dict[str, Optional[str]]:
    """Maps every backend to None (available) or the reason it is not, for ``op`` on ``device``.

    >>> import icl_kernels
    >>> icl_kernels.available_backends(device="cpu")["torch"] is None
    True
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return {name: be.unavailable_reason(op, dev, dtype) for name, be in _REGISTRY.items()}
