"""CUDA IPC between peers on one host: one process maps another's GPU KV tensors and copies pages
GPU to GPU (NVLink / PCIe peer-to-peer DMA), with no host bounce.

Mechanism only (see docs/p2p.md, "CUDA IPC"): the exporter describes each of its layout's tensors
as an :class:`IpcHandle` (plain ints, strings and bytes: no pickle crosses a socket); the importer
opens them once and then copies pages by page id. kvtier does not yet index which GPU pages hold
which chunk on a peer, so the TCP protocol does not negotiate this path yet: the caller must know
the source page ids (e.g. a co-located engine that shares its page table). UNTESTED on this
project's CPU-only machines; the tests are marked ``gpu``.

Example (process A exports, process B imports and copies pages 0..15 of A into its pages 16..31)::

    handles = export_tensors(layout_a.tensors)            # A: send these to B (same host)
    src = import_tensors(handles)                         # B: A's tensors, mapped
    copy_pages(src, layout_b.tensors, [0, ..., 15], [16, ..., 31], page_dim=1)
"""

from __future__ import annotations

from dataclasses import dataclass

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
        (_cls, size, stride, offset, _scls, dtype, device, handle, size_bytes, offset_bytes, _rg,
         rc_handle, rc_offset, ev_handle, ev_sync) = args
        out.append(IpcHandle(int(device), tuple(size), tuple(stride), int(offset),
                             str(dtype).removeprefix("torch."), bytes(handle), int(size_bytes),
                             int(offset_bytes), bytes(rc_handle), int(rc_offset), bytes(ev_handle),
                             bool(ev_sync)))
    return out


def import_tensors(handles: list[IpcHandle], device: int | None = None) -> list:
    """Map another process's tensors (same host). ``device``: the local device to open them on
    (default: the exporter's ordinal)."""
    torch = _torch()
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    out = []
    for h in handles:
        dtype = getattr(torch, h.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise InvalidArgumentError(f"unknown dtype {h.dtype!r} in an IPC handle")
        dev = h.device if device is None else device
        out.append(rebuild_cuda_tensor(torch.Tensor, torch.Size(h.shape), h.stride, h.offset,
                                       torch.storage.TypedStorage, dtype, dev, h.storage_handle,
                                       h.storage_size_bytes, h.storage_offset_bytes, False,
                                       h.ref_counter_handle, h.ref_counter_offset, h.event_handle,
                                       h.event_sync_required))
    return out


def copy_pages(src_tensors, dst_tensors, src_pages, dst_pages, *, page_dim: int = 1, stream=None) -> None:
    """Copy pages ``src_pages`` of ``src_tensors`` into ``dst_pages`` of ``dst_tensors``, tensor by
    tensor, along ``page_dim`` (1 for vLLM's ``[2, num_pages, ...]``, 0 for a cross-layer pool).
    Runs on ``stream`` (default: the current stream of the destination device); the caller waits
    on it. Contiguous runs of pages become one copy each, so a chunk is a few large DMAs."""
    torch = _torch()
    if len(src_tensors) != len(dst_tensors):
        raise InvalidArgumentError(f"{len(src_tensors)} source tensors, {len(dst_tensors)} destination tensors")
    if len(src_pages) != len(dst_pages):
        raise InvalidArgumentError(f"{len(src_pages)} source pages, {len(dst_pages)} destination pages")
    runs = []
    i = 0
    while i < len(src_pages):
        j = i + 1
        while j < len(src_pages) and src_pages[j] == src_pages[j - 1] + 1 and dst_pages[j] == dst_pages[j - 1] + 1:
            j += 1
        runs.append((src_pages[i], dst_pages[i], j - i))
        i = j
    stream = stream or torch.cuda.current_stream(dst_tensors[0].device)
    with torch.cuda.stream(stream):
        for s, d in zip(src_tensors, dst_tensors):
            if s.shape[:page_dim] != d.shape[:page_dim] or s.shape[page_dim + 1 :] != d.shape[page_dim + 1 :]:
                raise InvalidArgumentError(f"page shapes differ: {tuple(s.shape)} vs {tuple(d.shape)}")
            for s0, d0, n in runs:
                d.narrow(page_dim, d0, n).copy_(s.narrow(page_dim, s0, n), non_blocking=True)
