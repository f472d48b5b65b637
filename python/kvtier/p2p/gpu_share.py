"""Same-host sharing of a serving pool's pages between peers: a peer on this host maps the
exporter's KV tensors once, leases the chunks it wants (the exporter keeps their pages from
being evicted or rewritten), copies them page to page into its own pool, and releases them.

The wire side (GPU_OPEN / GPU_PIN / GPU_UNPIN) is in ``same_host.py``; this module holds what is
local to one process:

- :func:`host_id`: whether two members share a host (the kernel's boot id);
- the mechanisms that map and copy: :class:`CudaIpc` (GPU to GPU through CUDA IPC, no host
  bounce) and :class:`SharedMemory` (pools of CPU tensors backed by ``/dev/shm`` files: the same
  protocol for CPU inference on one host, and what the multiprocess tests run on machines with
  no GPU);
- :class:`GpuShare`, what a member shares: its pool's tensors and the object that pins pages
  (``kvtier.PagedKVPool`` implements ``share_has`` / ``share_pin`` / ``share_unpin``);
- :class:`LeaseTable`, the exporter's record of pinned chunks; every lease expires.

A lease bounds how long an importer may read the pages: the importer counts a copy only if it
finished before the lease's end (less a margin), so a lease that expired while a copy ran is a
miss, never pages rewritten under the copy.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kvtier.errors import InvalidArgumentError
from kvtier.p2p.protocol import SharedTensor


def host_id() -> str:
    """This host's identity: the kernel boot id (distinct per machine and per boot; containers
    on one host share it), falling back to the host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()[:64]
    except OSError:
        return socket.gethostname()[:64]


class Done(Protocol):
    def wait(self, timeout_s: float) -> bool:
        """True once the copy finished, False if it had not by ``timeout_s``."""


class PageCopy(Protocol):
    """Copies pages of one mapped peer pool into the local pool (made once per mapping)."""

    def copy(self, src_pages, dst_pages, stream: int) -> Done: ...


class Mechanism(Protocol):
    """How a pool's tensors are mapped by another process on this host, and copied from."""

    name: str

    def export(self, tensors) -> list[SharedTensor]: ...

    def open(self, shared: list[SharedTensor]) -> list: ...

    def copier(self, src, dst, page_dim: int) -> PageCopy: ...


class _Finished:
    def wait(self, timeout_s: float) -> bool:
        return True


class _EventDone:
    """A CUDA event recorded after the copy; polled to a deadline (a stuck GPU is a miss)."""

    def __init__(self, event) -> None:
        self._event = event

    def wait(self, timeout_s: float) -> bool:
        end = time.monotonic() + max(timeout_s, 0.0)
        pause = 20e-6
        while not self._event.query():
            if time.monotonic() >= end:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        return True


class CudaIpc:
    """GPU to GPU through CUDA IPC: peers map each other's pool tensors (``cuda_ipc``) and copy
    pages with the core's batched peer-to-peer copy, on the importer's GPU ``device``."""

    name = "cuda"

    def __init__(self, device: int, method: str = "kernel") -> None:
        self.device = int(device)
        self.method = method

    def export(self, tensors) -> list[SharedTensor]:
        from dataclasses import asdict

        from kvtier.p2p import cuda_ipc

        return [SharedTensor(**asdict(h)) for h in cuda_ipc.export_tensors(tensors)]

    def open(self, shared: list[SharedTensor]) -> list:
        from dataclasses import asdict

        from kvtier.p2p import cuda_ipc

        return cuda_ipc.import_tensors([cuda_ipc.IpcHandle(**asdict(s)) for s in shared], device=self.device)

    def copier(self, src, dst, page_dim: int) -> PageCopy:
        from kvtier.p2p.cuda_ipc import PageCopier

        return _CudaPageCopy(PageCopier(src, dst, page_dim), self.device, self.method)


class _CudaPageCopy:
    """A mapped peer pool's pages copied on the local GPU; the tensors' geometry is worked out
    once (``PageCopier``), each copy is followed by an event to wait on."""

    def __init__(self, copier, device: int, method: str) -> None:
        self._copier, self._device, self._method = copier, device, method

    def copy(self, src_pages, dst_pages, stream: int) -> Done:
        import torch

        dev = torch.device("cuda", self._device)
        s = torch.cuda.ExternalStream(stream, device=dev) if stream else torch.cuda.current_stream(dev)
        self._copier.copy(src_pages, dst_pages, stream=s, method=self._method)
        event = torch.cuda.Event()
        event.record(s)
        return _EventDone(event)


class SharedMemory:
    """CPU pool tensors backed by files in ``directory`` (``/dev/shm``: memory, not disk), mapped
    by peers on this host with ``torch.from_file(shared=True)``. :meth:`allocate` makes a pool's
    tensors; :meth:`close` removes the files (a process killed before that leaves them behind:
    they are named ``kvtier-<pid>-*``)."""

    name = "shm"

    def __init__(self, directory: str = "/dev/shm") -> None:
        self.directory = os.path.realpath(directory)
        self._paths: dict[int, str] = {}  # data_ptr of a tensor made here -> its file
        self._prefix = f"kvtier-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._count = itertools.count()

    def allocate(self, shape, dtype):
        import torch

        numel = int(np.prod(shape))
        path = os.path.join(self.directory, f"{self._prefix}-{next(self._count)}")
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        with open(path, "wb") as f:
            f.truncate(nbytes)
        t = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(*shape)
        self._paths[t.data_ptr()] = path
        return t

    def export(self, tensors) -> list[SharedTensor]:
        out = []
        for i, t in enumerate(tensors):
            path = self._paths.get(t.data_ptr())
            if path is None or not t.is_contiguous():
                raise InvalidArgumentError(f"tensors[{i}] was not allocated by this SharedMemory")
            out.append(
                SharedTensor(
                    -1,
                    tuple(t.shape),
                    tuple(t.stride()),
                    0,
                    str(t.dtype).removeprefix("torch."),
                    path.encode(),
                    t.numel() * t.element_size(),
                    0,
                )
            )
        return out

    def open(self, shared: list[SharedTensor]) -> list:
        import torch

        out = []
        for s in shared:
            path = os.path.realpath(s.storage_handle.decode("utf-8", "replace"))
            if os.path.dirname(path) != self.directory or not os.path.basename(path).startswith("kvtier-"):
                raise InvalidArgumentError(f"shared tensor file {path!r} is not a kvtier file in {self.directory}")
            dtype = getattr(torch, s.dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise InvalidArgumentError(f"unknown dtype {s.dtype!r} in a shared tensor")
            numel = int(np.prod(s.shape))
            if numel * torch.empty((), dtype=dtype).element_size() != s.storage_size_bytes:
                raise InvalidArgumentError(f"shared tensor {path!r}: shape and byte size disagree")
            if os.path.getsize(path) != s.storage_size_bytes:
                raise InvalidArgumentError(f"shared tensor {path!r} is not {s.storage_size_bytes} bytes")
            out.append(torch.from_file(path, shared=True, size=numel, dtype=dtype).view(*s.shape))
        return out

    def copier(self, src, dst, page_dim: int) -> PageCopy:
        return _HostPageCopy(src, dst, page_dim)

    def close(self) -> None:
        for path in self._paths.values():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._paths.clear()


class _HostPageCopy:
    """A mapped peer pool's pages copied by the CPU: one copy per run of pages contiguous on
    both sides, per tensor; done when it returns."""

    def __init__(self, src, dst, page_dim: int) -> None:
        self._src, self._dst, self._page_dim = src, dst, page_dim

    def copy(self, src_pages, dst_pages, stream: int) -> Done:
        from kvtier.p2p.cuda_ipc import _page_runs

        runs = _page_runs(np.asarray(src_pages, dtype=np.int64), np.asarray(dst_pages, dtype=np.int64))
        pd = self._page_dim
        for s, d in zip(self._src, self._dst):
            for s0, d0, n in runs:
                d.narrow(pd, d0, n).copy_(s.narrow(pd, s0, n))
        return _Finished()


class PageSource(Protocol):
    """What a pool shares: which chunks it holds, and pins that keep their pages as they are."""

    def share_has(self, key: bytes) -> bool: ...

    def share_pin(self, keys: list[bytes]) -> list[tuple[int, ...]]:
        """Pin the leading chunks of ``keys`` the pool holds, their KV complete; their pages."""

    def share_unpin(self, keys: list[bytes]) -> None: ...


@dataclass
class GpuShare:
    """One member's part in same-host sharing: its pool ``tensors`` (exported to peers, and the
    destination of its own pulls), pages along ``page_dim``; ``pages``: the pool that pins them
    (None: this member imports only)."""

    mechanism: Mechanism
    tensors: list
    page_dim: int
    pages: PageSource | None = None

    def check_peer(self, shared: list[SharedTensor], page_dim: int) -> None:
        """A peer's tensors must page like ours (same count, dtype, page shape)."""
        if page_dim != self.page_dim or len(shared) != len(self.tensors):
            raise InvalidArgumentError(
                f"peer pool of {len(shared)} tensors paged along {page_dim}, "
                f"ours {len(self.tensors)} along {self.page_dim}"
            )
        for s, t in zip(shared, self.tensors):
            mine = tuple(t.shape)
            if (
                s.dtype != str(t.dtype).removeprefix("torch.")
                or len(s.shape) != len(mine)
                or s.shape[:page_dim] != mine[:page_dim]
                or s.shape[page_dim + 1 :] != mine[page_dim + 1 :]
            ):
                raise InvalidArgumentError(f"peer tensor {s.shape} {s.dtype} does not page like ours {mine} {t.dtype}")

    def num_pages(self, shared: list[SharedTensor]) -> int:
        return min(s.shape[self.page_dim] for s in shared)


class LeaseTable:
    """The exporter's pinned chunks: lease id -> (keys, expiry). Thread-safe."""

    def __init__(self, unpin) -> None:
        self._unpin = unpin
        self._lock = threading.Lock()
        self._leases: dict[int, tuple[list[bytes], float]] = {}
        self._ids = itertools.count(1)

    def add(self, keys: list[bytes], seconds: float) -> int:
        with self._lock:
            lid = next(self._ids)
            self._leases[lid] = (keys, time.monotonic() + seconds)
            return lid

    def release(self, lease_id: int) -> bool:
        with self._lock:
            entry = self._leases.pop(lease_id, None)
        if entry is None:
            return False
        self._unpin(entry[0])
        return True

    def expire(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        with self._lock:
            gone = [lid for lid, (_k, t) in self._leases.items() if t <= now]
            entries = [self._leases.pop(lid) for lid in gone]
        for keys, _t in entries:
            self._unpin(keys)
        return len(entries)

    def release_all(self) -> None:
        self.expire(float("inf"))

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)
