"""Small host-to-GPU uploads (token ids, page tables) that do not wait behind a tier load.

A load from the CPU tier queues gigabytes of host-to-device copies on the GPU's copy engine at
once (a 32k-token Llama-3-8B hit is 4 GiB). A later ``tensor.to("cuda", non_blocking=True)`` on
the compute stream goes to the same engine and lands after all of them, so the compute stream,
whose first kernel needs that upload, idles until the whole load is in: the layer-by-layer
overlap of compute with the load is lost (docs/architecture.md, "Measurements behind the
design", has the trace). :func:`to_device` moves the
bytes with kvtier's copy kernel instead (``_core.copy_segments(..., method="kernel")``): the
GPU's SMs read the pinned host memory directly, so the upload is ordered only on the caller's
stream, not behind the copy engine's queue.

Engines that upload per-step metadata while kvtier loads (the reference engine in
:mod:`kvtier.examples.paged_llama`) use it; vLLM's model runner uploads its metadata before the
connector starts a step's loads, so the order alone avoids the wait there.
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

from kvtier.errors import DeadlineExceededError

__all__ = ["to_device"]

_MAX_LIVE = 1024  # uploads whose pinned source is kept until its copy is seen done
_WAIT_S = 60.0  # the longest an upload waits for the oldest unfinished one beyond _MAX_LIVE


class _KernelUploads:
    """Keeps each upload's pinned source alive until a CUDA event after its copy has passed
    (torch's pinned-memory cache would otherwise hand the block to another tensor while the
    kernel still reads it). Falls back to ``non_blocking`` copies where the core has no CUDA."""

    def __init__(self) -> None:
        self._live: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self.kernel = None  # None: not tried yet; then True / False

    def _prune(self, block: bool) -> None:
        """Drops the sources whose copies are done; with ``block``, also waits (polling, up to
        ``_WAIT_S``) for the oldest while more than ``_MAX_LIVE`` are unfinished."""
        while self._live and (self._live[0][1].query() or (block and len(self._live) > _MAX_LIVE)):
            _src, ev = self._live[0]
            deadline = time.monotonic() + _WAIT_S
            while not ev.query():
                if time.monotonic() > deadline:
                    raise DeadlineExceededError(
                        f"kvtier.upload: the oldest of {len(self._live)} unfinished uploads did not complete "
                        f"within {_WAIT_S:.0f} s (is the GPU stream stalled?)"
                    )
                time.sleep(50e-6)
            self._live.popleft()

    def upload(self, host, device):
        import torch

        from kvtier import _core

        if self.kernel is None:
            self.kernel = bool(getattr(_core, "CUDA_COMPILED", False))
        src = host.contiguous().pin_memory()
        if not self.kernel or src.numel() == 0:
            return src.to(device, non_blocking=True)
        out = torch.empty(src.shape, dtype=src.dtype, device=device)
        stream = torch.cuda.current_stream(device)
        arr = lambda v: np.array([v], dtype=np.uint64)  # noqa: E731
        try:
            _core.copy_segments(
                out.device.index,
                arr(src.data_ptr()),
                arr(out.data_ptr()),
                arr(src.numel() * src.element_size()),
                int(stream.cuda_stream),
                "kernel",
            )
        except Exception:  # noqa: BLE001 - the core cannot run its kernel here: the copy engine, as torch does
            self.kernel = False
            return src.to(device, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(stream)
        with self._lock:
            self._live.append((src, ev))
            self._prune(block=True)
        return out


_UPLOADS = _KernelUploads()


def to_device(values, device, dtype=None):
    """``values`` (a list, array or CPU tensor; int64 unless ``dtype``) as a tensor on ``device``.

    On a GPU the copy is queued on the device's current stream and the host goes on; it is run
    by a kernel reading pinned host memory, so it does not wait behind tier loads queued on the
    copy engine (see the module's doc). Elsewhere a plain ``.to(device)``.
    """
    import torch

    t = torch.as_tensor(values, dtype=dtype if dtype is not None else torch.long)
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":  # nothing to upload from the host
        return t.to(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _UPLOADS.upload(t, device)
