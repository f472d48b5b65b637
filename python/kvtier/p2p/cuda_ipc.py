"""CUDA IPC between peers on one host: one process maps another's GPU KV tensors and copies pages
GPU to GPU (NVLink / PCIe peer-to-peer DMA), with no host bounce.

Mechanism only (see docs/p2p.md, "CUDA IPC"): the exporter describes each of its layout's tensors
as an :class:`IpcHandle` (plain ints, strings and bytes: no pickle crosses a socket); the importer
opens them once and then copies pages by page id. The peer protocol negotiates it for pools that
share their pages (gpu_share.py: GPU_OPEN, GPU_PIN, GPU_UNPIN); the functions here can also be
used directly by a caller that knows the source page ids. The tests are marked ``gpu``;
bench/bench_p2p_gpu.py measures it.

Example (process A exports, process B imports and copies pages 0..15 of A into its pages 16..31)::

    handles = export_tensors(layout_a.tensors)            # A: send these to B (same host)
    src = import_tensors(handles)                         # B: A's tensors, mapped
    copy_pages(src, layout_b.tensors, [0, ..., 15], [16, ..., 31], page_dim=1)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvtier.errors import InvalidArgumentError, UnavailableError


@dataclass(frozen=True)
class IpcHandle:
    """What another process on this host needs to map one CUDA tensor."""

    device: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # in elements
    dtype: str
    storage_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


def _torch():
    try:
        import torch
    except ImportError as e:
        raise UnavailableError(f"CUDA IPC needs torch: {e}") from None
    if not torch.cuda.is_available():
        raise UnavailableError("CUDA IPC needs a CUDA device")
    return torch


def export_tensors(tensors) -> list[IpcHandle]:
    """IPC handles of ``tensors`` (CUDA tensors: a layout's ``tensors``). The exporter must keep
    the tensors alive while importers use them (torch's IPC reference counter tracks them)."""
    torch = _torch()
    from torch.multiprocessing.reductions import reduce_tensor

    out = []
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or not t.is_cuda:
            raise InvalidArgumentError(f"tensors[{i}] must be a CUDA tensor")
        _rebuild, args = reduce_tensor(t)
        # (cls, size, stride, offset, storage_cls, dtype, device, handle, size_bytes, offset_bytes,
        #  requires_grad, ref_counter_handle, ref_counter_offset, event_handle, event_sync_required)
        (
            _cls,
            size,
            stride,
            offset,
            _scls,
            dtype,
            device,
            handle,
            size_bytes,
            offset_bytes,
            _rg,
            rc_handle,
            rc_offset,
            ev_handle,
            ev_sync,
        ) = args
        out.append(
            IpcHandle(
                int(device),
                tuple(size),
                tuple(stride),
                int(offset),
                str(dtype).removeprefix("torch."),
                bytes(handle),
                int(size_bytes),
                int(offset_bytes),
                bytes(rc_handle),
                int(rc_offset),
                bytes(ev_handle),
                bool(ev_sync),
            )
        )
    return out


def import_tensors(handles: list[IpcHandle], device: int | None = None) -> list:
    """Map another process's tensors (same host). ``device``: the local GPU that will read them,
    i.e. run the copies (default: the exporter's ordinal). Open them there: the runtime then maps
    the exporter's memory into that GPU's address space through peer access; a mapping opened on
    another GPU is not readable by this one's kernels."""
    torch = _torch()
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    out = []
    for h in handles:
        dtype = getattr(torch, h.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise InvalidArgumentError(f"unknown dtype {h.dtype!r} in an IPC handle")
        dev = h.device if device is None else device
        out.append(
            rebuild_cuda_tensor(
                torch.Tensor,
                torch.Size(h.shape),
                h.stride,
                h.offset,
                torch.storage.TypedStorage,
                dtype,
                dev,
                h.storage_handle,
                h.storage_size_bytes,
                h.storage_offset_bytes,
                False,
                h.ref_counter_handle,
                h.ref_counter_offset,
                h.event_handle,
                h.event_sync_required,
            )
        )
    return out


def _page_runs(src_pages: np.ndarray, dst_pages: np.ndarray) -> list[tuple[int, int, int]]:
    """(first source page, first destination page, length) of each run contiguous on both sides."""
    if len(src_pages) == 0:
        return []
    breaks = np.flatnonzero((np.diff(src_pages) != 1) | (np.diff(dst_pages) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts, [len(src_pages)])))
    return list(zip(src_pages[starts].tolist(), dst_pages[starts].tolist(), lengths.tolist()))


class PageCopier:
    """Copies pages from ``src_tensors`` into ``dst_tensors`` (pairwise, along ``page_dim``): the
    tensors are checked and their geometry worked out once, so each :meth:`copy` is one call into
    the core, which checks the page lists and turns them into byte ranges for all tensors at once
    (``_core.PageRows``). Keep one per pair of tensor lists that are copied between repeatedly (a
    mapped peer pool and the local pool)."""

    def __init__(self, src_tensors, dst_tensors, page_dim: int = 1) -> None:
        src_tensors, dst_tensors = list(src_tensors), list(dst_tensors)
        if len(src_tensors) != len(dst_tensors):
            raise InvalidArgumentError(f"{len(src_tensors)} source tensors, {len(dst_tensors)} destination tensors")
        if not src_tensors:
            raise InvalidArgumentError("no tensors to copy between")
        for s, d in zip(src_tensors, dst_tensors):
            if (
                s.dtype != d.dtype
                or s.dim() != d.dim()
                or not 0 <= page_dim < s.dim()
                or s.shape[:page_dim] != d.shape[:page_dim]
                or s.shape[page_dim + 1 :] != d.shape[page_dim + 1 :]
            ):
                raise InvalidArgumentError(
                    f"page shapes differ: {tuple(s.shape)} {s.dtype} vs {tuple(d.shape)} {d.dtype} "
                    f"(page dim {page_dim})"
                )
        self.src, self.dst, self.page_dim = src_tensors, dst_tensors, page_dim
        self.src_limit = min(t.shape[page_dim] for t in src_tensors)
        self.dst_limit = min(t.shape[page_dim] for t in dst_tensors)
        self.device = dst_tensors[0].device
        self._rows = None  # contiguous tensors: every outer row's address, as _core.PageRows
        if all(t.is_contiguous() for t in (*src_tensors, *dst_tensors)):
            from kvtier import _core

            src_rows, dst_rows, page_bytes = [], [], []
            for s, d in zip(src_tensors, dst_tensors):
                pb = int(np.prod(s.shape[page_dim + 1 :], dtype=np.int64)) * s.element_size()
                outer = np.arange(int(np.prod(s.shape[:page_dim], dtype=np.int64)), dtype=np.uint64)
                # Contiguous: outer row o of a tensor starts at o * (its pages) * page_bytes.
                src_rows.append(np.uint64(s.data_ptr()) + outer * np.uint64(s.shape[page_dim] * pb))
                dst_rows.append(np.uint64(d.data_ptr()) + outer * np.uint64(d.shape[page_dim] * pb))
                page_bytes.append(np.full(len(outer), pb, dtype=np.uint64))
            # The core turns page lists into byte ranges and copies them in one call (no numpy
            # work per copy: a copy's host time is part of its cost).
            self._rows = _core.PageRows(
                np.concatenate(src_rows),
                np.concatenate(dst_rows),
                np.concatenate(page_bytes),
                self.src_limit,
                self.dst_limit,
            )

    def _pages(self, src_pages, dst_pages) -> tuple[np.ndarray, np.ndarray]:
        src_pages = np.asarray(src_pages, dtype=np.int64).ravel()
        dst_pages = np.asarray(dst_pages, dtype=np.int64).ravel()
        if len(src_pages) != len(dst_pages):
            raise InvalidArgumentError(f"{len(src_pages)} source pages, {len(dst_pages)} destination pages")
        for what, pages, limit in (("source", src_pages, self.src_limit), ("destination", dst_pages, self.dst_limit)):
            if len(pages) and (pages.min() < 0 or pages.max() >= limit):
                raise InvalidArgumentError(f"{what} pages outside [0, {limit})")
        return src_pages, dst_pages

    def segments(self, src_pages, dst_pages) -> np.ndarray | None:
        """``[n, 3]`` uint64 rows (source address, destination address, bytes): one per run of
        pages contiguous on both sides, per outer row of every tensor; None for tensors that are
        not contiguous (``copy`` then copies run by run with torch)."""
        src_pages, dst_pages = self._pages(src_pages, dst_pages)
        return None if self._rows is None else self._rows.segments(src_pages, dst_pages)

    def copy(self, src_pages, dst_pages, *, stream=None, method: str = "dma") -> str:
        """Copy pages ``src_pages`` into ``dst_pages`` on ``stream`` (default: the destination
        device's current stream); the caller waits on it. Returns the path taken (see
        :func:`copy_pages`)."""
        if method not in ("dma", "kernel", "push"):
            raise InvalidArgumentError(f"method must be 'dma', 'kernel' or 'push', got {method!r}")
        torch = _torch()
        stream = stream or torch.cuda.current_stream(self.device)
        from kvtier import _core

        if self._rows is not None and _core.CUDA_COMPILED:
            # The core checks the page ids (InvalidArgumentError naming the side) and works out
            # the ranges. The sources may still be written on the exporter's side: it
            # synchronizes before it publishes page ids. Here the copy only follows the
            # destination stream's earlier work.
            flat = lambda p: p if isinstance(p, list) else np.asarray(p, dtype=np.int64).ravel()  # noqa: E731
            self._rows.copy(self.device.index, flat(src_pages), flat(dst_pages), int(stream.cuda_stream), method)
            return method
        src_pages, dst_pages = self._pages(src_pages, dst_pages)
        runs = _page_runs(src_pages, dst_pages)
        pd = self.page_dim
        with torch.cuda.stream(stream):
            for s, d in zip(self.src, self.dst):
                for s0, d0, n in runs:
                    d.narrow(pd, d0, n).copy_(s.narrow(pd, s0, n), non_blocking=True)
        return "torch"


def copy_pages(
    src_tensors, dst_tensors, src_pages, dst_pages, *, page_dim: int = 1, stream=None, method: str = "dma"
) -> str:
    """Copy pages ``src_pages`` of ``src_tensors`` into ``dst_pages`` of ``dst_tensors``, tensor by
    tensor, along ``page_dim`` (1 for vLLM's ``[2, num_pages, ...]``, 0 for a cross-layer pool).
    Runs on ``stream`` (default: the current stream of the destination device); the caller waits
    on it. Every contiguous run of pages of every tensor is one byte range (a chunk of a
    32-layer model is hundreds of them: one torch ``copy_`` each costs more in launches than in
    bytes), and ``method`` picks how the core copies them all at once:

    - ``"dma"`` (default): the copy engines, through cudaMemcpyBatchAsync (peer to peer over
      NVLink or PCIe);
    - ``"kernel"``: one launch of the core's segment copy kernel on the destination GPU, reading
      the source through peer access (SMs do the copy; it competes with the model's kernels);
    - ``"push"``: the same kernel on the GPU that holds the sources, writing into the
      destinations through peer access (NVLink carries writes more efficiently than remote
      reads). It runs on an internal stream of that GPU, after ``stream``'s earlier work and
      before its later work; that GPU's SMs do the copy (with CUDA IPC: the exporting peer's GPU,
      beside the peer's own kernels). Where the sources are on the destination GPU (or in host
      memory) it is ``"kernel"``. With CUDA IPC the source GPU's kernels must be able to address
      the mapping: ``FailedPreconditionError`` where the runtime says they cannot.

    Returns the path taken: ``method``, or ``"torch"`` (one ``copy_`` per run per tensor) where
    the core has no CUDA or a tensor is not contiguous.
    """
    return PageCopier(src_tensors, dst_tensors, page_dim).copy(src_pages, dst_pages, stream=stream, method=method)
