"""Shared pytest setup: hardware markers that skip loudly when the hardware is absent."""

from __future__ import annotations

import functools
import warnings

import pytest


@functools.cache
def cuda_unavailable_reason() -> str | None:
    """None when torch sees a usable CUDA device, else why not (torch missing, no driver, ...)."""
    try:
        with warnings.catch_warnings():  # torch's own import-time warnings are not ours to fail on
            warnings.simplefilter("ignore")
            import torch
    except ImportError as e:
        return f"torch is not installed ({e})"
    try:
        with warnings.catch_warnings():  # e.g. "CUDA initialization: driver too old" UserWarning
            warnings.simplefilter("ignore")
            if torch.cuda.is_available() and torch.cuda.device_count() > 0:
                return None
    except Exception as e:  # noqa: BLE001 - a broken driver must skip the GPU tests, not error them
        return f"torch.cuda failed to initialise ({type(e).__name__}: {e})"
    return f"torch {torch.__version__} sees no usable CUDA device"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Probe only when some collected test needs a GPU: importing torch costs seconds.
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = cuda_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"SKIPPED (needs a CUDA GPU): {reason}")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def gpu():
    """The torch CUDA device for a test; skips (with the reason) where there is none.

    Tests that need a GPU should also carry ``@pytest.mark.gpu`` so ``-m "not gpu"`` deselects them.
    """
    reason = cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(f"SKIPPED (needs a CUDA GPU): {reason}")
    import torch

    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(params=["io_uring", "posix"])
def disk_backend(request):
    """Each disk I/O backend in turn; io_uring skips (saying why) where it cannot run."""
    from _util import io_uring_works

    if request.param == "io_uring" and not io_uring_works():
        pytest.skip("io_uring not compiled in or refused by this kernel")
    return request.param
