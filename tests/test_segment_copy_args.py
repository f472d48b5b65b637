"""Argument checks of the GPU segment copy (``_core.copy_segments``, ``PageCopier.copy``) that
run without a GPU: they fail (or return) before any CUDA call."""

from __future__ import annotations

import numpy as np
import pytest
from kvtier import _core
from kvtier.errors import InvalidArgumentError, KVTierError, UnavailableError

METHODS = ["dma", "kernel", "push"]


def _u64(*xs):
    return np.asarray(xs, dtype=np.uint64)


def test_copy_segments_names_every_method_on_a_bad_one():
    with pytest.raises(InvalidArgumentError, match="'dma', 'kernel' or 'push', got 'pull'"):
        _core.copy_segments(0, _u64(1), _u64(2), _u64(8), 0, "pull")


@pytest.mark.parametrize("method", METHODS)
def test_copy_segments_checks_its_arrays_and_addresses(method):
    with pytest.raises(InvalidArgumentError, match="1-D arrays of one length"):
        _core.copy_segments(0, _u64(1, 2), _u64(2), _u64(8), 0, method)
    if not _core.CUDA_COMPILED:
        with pytest.raises(UnavailableError):
            _core.copy_segments(0, _u64(0), _u64(2), _u64(8), 0, method)
        return
    # Checked before the device is: a null address is the caller's error on every machine.
    with pytest.raises(InvalidArgumentError, match="segment 1 has a null address"):
        _core.copy_segments(0, _u64(1, 0), _u64(2, 16), _u64(8, 8), 0, method)
    # Nothing to copy: no CUDA call at all.
    _core.copy_segments(0, _u64(0, 5), _u64(0, 6), _u64(0, 0), 0, method)
    _core.copy_segments(0, _u64(), _u64(), _u64(), 0, method)


def test_push_device_without_a_gpu_is_an_error_not_a_crash():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/test_p2p_gpu.py covers push_device")
    with pytest.raises(KVTierError):
        _core.push_device(0, 4096)


def test_page_copier_names_every_method_on_a_bad_one():
    torch = pytest.importorskip("torch")
    from kvtier.p2p.cuda_ipc import PageCopier, copy_pages

    src = [torch.zeros(2, 4, 8, dtype=torch.bfloat16)]
    dst = [torch.zeros(2, 6, 8, dtype=torch.bfloat16)]
    with pytest.raises(InvalidArgumentError, match="'dma', 'kernel' or 'push', got 'pull'"):
        PageCopier(src, dst, 1).copy([0], [1], method="pull")
    with pytest.raises(InvalidArgumentError, match="'push'"):
        copy_pages(src, dst, [0], [1], method="")
