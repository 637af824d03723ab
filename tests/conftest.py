"""Test configuration shared by every test file.

Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors:
TRITON_INTERPRET must be set before any Triton kernel is defined, so it is
set here, before the tests import icl_kernels.
"""
import os

import pytest


def _gpu_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


HAS_GPU = _gpu_present()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_large = pytest.mark.skip(reason="allocates > 2^31 elements; set ICL_TEST_LARGE=1 to run")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)
        if "large" in item.keywords and os.environ.get("ICL_TEST_LARGE", "0") != "1":
            item.add_marker(skip_large)


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    """Tests choose backends explicitly; a user's ICL_KERNELS_BACKEND must not leak in."""
    monkeypatch.delenv("ICL_KERNELS_BACKEND", raising=False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is faster, and on a shared machine idle OpenMP
    threads would spin-wait. Test modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
