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


# -- _core.PageRows: page lists -> byte ranges, in the core ---------------------------------------
from hypothesis import given, settings
from hypothesis import strategies as st


def _reference_segments(src_rows, dst_rows, page_bytes, src_pages, dst_pages):
    """Independent of the core: merge page i into the previous range of its row where both sides
    continue it."""
    out = []
    for sr, dr, pb in zip(src_rows, dst_rows, page_bytes):
        row = []
        for s, d in zip(src_pages, dst_pages):
            if row and s == row[-1][3] + 1 and d == row[-1][4] + 1:
                row[-1][2] += pb
                row[-1][3], row[-1][4] = s, d
            else:
                row.append([sr + s * pb, dr + d * pb, pb, s, d])
        out += [(a, b, n) for a, b, n, _, _ in row]
    return out


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_page_rows_segments_match_a_reference(data):
    rows = data.draw(st.integers(1, 4))
    pages = data.draw(st.integers(1, 40))
    n = data.draw(st.integers(0, pages))
    src_pages = data.draw(st.lists(st.integers(0, pages - 1), min_size=n, max_size=n))
    dst_pages = data.draw(st.lists(st.integers(0, pages - 1), min_size=n, max_size=n))
    if data.draw(st.booleans()):  # runs: consecutive on both sides
        start_s, start_d = data.draw(st.integers(0, pages - n)), data.draw(st.integers(0, pages - n))
        src_pages, dst_pages = list(range(start_s, start_s + n)), list(range(start_d, start_d + n))
    src_rows = [(1 << 40) + r * (1 << 30) for r in range(rows)]
    dst_rows = [(1 << 41) + r * (1 << 30) for r in range(rows)]
    page_bytes = [data.draw(st.sampled_from([16, 4096, 32768])) for _ in range(rows)]
    plan = _core.PageRows(_u64(*src_rows), _u64(*dst_rows), _u64(*page_bytes), pages, pages)
    got = [tuple(int(x) for x in r) for r in plan.segments(src_pages, dst_pages)]
    assert got == _reference_segments(src_rows, dst_rows, page_bytes, src_pages, dst_pages)


def test_page_rows_name_the_bad_side_and_lengths():
    plan = _core.PageRows(_u64(1 << 40), _u64(1 << 41), _u64(4096), 8, 4)
    with pytest.raises(InvalidArgumentError, match=r"source pages outside \[0, 8\): 8 at 1"):
        plan.segments([0, 8], [0, 1])
    with pytest.raises(InvalidArgumentError, match=r"destination pages outside \[0, 4\): -1 at 0"):
        plan.segments([0], [-1])
    with pytest.raises(InvalidArgumentError, match="2 source pages, 1 destination pages"):
        plan.segments([0, 1], [0])
    with pytest.raises(InvalidArgumentError, match="one length"):
        _core.PageRows(_u64(1, 2), _u64(1), _u64(4096), 8, 8)
    with pytest.raises(InvalidArgumentError, match="'dma', 'kernel' or 'push', got 'pull'"):
        plan.copy(0, [0], [0], 0, "pull")
    if not _core.CUDA_COMPILED:
        with pytest.raises(UnavailableError):
            plan.copy(0, [0], [0], 0, "dma")
