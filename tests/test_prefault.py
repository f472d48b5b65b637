"""cpu.prefault: a plain host tier's memory is faulted in on a background thread when the cache
opens (kvtier.prefault), checked with mincore(2): resident after, not before; stores and loads
running beside it keep their bytes; a tier larger than half of MemAvailable is left alone."""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys

import kvtier.prefault
import numpy as np
import pytest
import torch
from _util import wait_until
from kvtier import KVCache, Layout
from kvtier.prefault import Prefaulter, mem_available_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise / mincore are Linux's")
PAGE = mmap.PAGESIZE


def resident_fraction(address: int, nbytes: int) -> float:
    """The fraction of the pages of [address, address + nbytes) in memory (mincore(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    pages = -(-nbytes // PAGE)
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(address, nbytes, vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) / pages


def cpu_layout(pages: int = 64):
    g = torch.Generator().manual_seed(1)
    kv = [torch.randn(2, pages, 16, 4, 64, generator=g).to(torch.bfloat16) for _ in range(2)]
    return kv, Layout.from_vllm(kv, chunk_tokens=32)


def test_the_tier_is_resident_once_prefaulted_and_not_without():
    _, layout = cpu_layout()
    with KVCache(layout, cpu_bytes=64 << 20, method="cpu") as cache:  # off by default
        address, nbytes = cache.tier.arena_region
        assert cache.tier.arena_kind == "host"
        assert resident_fraction(address, nbytes) < 0.05  # nothing stored: nothing faulted in
        assert "prefaulted_bytes" not in cache.stats()
    with KVCache(layout, cpu_bytes=64 << 20, method="cpu", cpu_prefault=True) as cache:
        address, nbytes = cache.tier.arena_region
        wait_until(lambda: cache.stats()["prefaulted_bytes"] == nbytes, 60)
        s = cache.stats()
        assert s["prefault_bytes"] == nbytes and s["prefault_error"] == ""
        assert resident_fraction(address, nbytes) == 1.0


def test_stores_and_loads_beside_the_prefault_keep_their_bytes():
    kv, layout = cpu_layout(pages=128)
    tokens = list(range(5, 5 + 32 * 32))  # 32 chunks of 2 pages
    want = [t[:, :64].clone() for t in kv]
    with KVCache(layout, cpu_bytes=512 << 20, method="cpu", cpu_prefault=True) as cache:
        assert cache.store(tokens, range(64)).wait() == 32  # while the tier is being populated
        for t in kv:
            t[:, :64] = 0
        assert cache.load(tokens, range(64)).wait() == len(tokens)
        assert all(torch.equal(t[:, :64], w) for t, w in zip(kv, want, strict=True))
        wait_until(lambda: cache.stats()["prefaulted_bytes"] == cache.stats()["prefault_bytes"], 60)
        for t in kv:
            t[:, :64] = 0
        assert cache.load(tokens, range(64)).wait() == len(tokens)  # populating wrote nothing
        assert all(torch.equal(t[:, :64], w) for t, w in zip(kv, want, strict=True))


def test_a_tier_over_half_of_mem_available_is_not_prefaulted(monkeypatch, caplog):
    _, layout = cpu_layout()
    monkeypatch.setattr(kvtier.prefault, "mem_available_bytes", lambda: 64 << 20)
    caplog.set_level(logging.INFO, logger="kvtier.cache")
    with KVCache(layout, cpu_bytes=64 << 20, method="cpu", cpu_prefault=True) as cache:
        assert "prefaulted_bytes" not in cache.stats()
    assert "cpu.prefault skipped" in caplog.text and "MemAvailable" in caplog.text


def test_close_stops_the_prefault_between_steps():
    buf = mmap.mmap(-1, 1 << 30)  # 1 GiB, untouched
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    p = Prefaulter(address, len(buf))
    p.close()
    done = p.stats()["prefaulted_bytes"]
    assert done % kvtier.prefault.STEP_BYTES == 0 and done <= len(buf)
    assert resident_fraction(address, len(buf)) <= done / len(buf) + 0.01  # nothing after the stop
    del address
    buf.close()


def test_mem_available_parses_meminfo(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   1000 kB\n")
    assert mem_available_bytes(str(f)) == 1000 * 1024
    f.write_text("MemTotal: 5 kB\n")
    assert mem_available_bytes(str(f)) is None
    assert mem_available_bytes(str(tmp_path / "missing")) is None
    assert np.int64(mem_available_bytes()) > 0  # this machine's
