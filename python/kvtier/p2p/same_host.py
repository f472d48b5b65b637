"""SameHostSharing: a peer service's page sharing with the members on its host (gpu_share.py):
leasing our pool's pages to them, and copying what their pools hold straight into a load's pages."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import numpy as np

from kvtier.errors import DeadlineExceededError, KVTierError
from kvtier.p2p import protocol as P
from kvtier.p2p.config import PeerConfig
from kvtier.p2p.gpu_share import GpuShare, LeaseTable, host_id
from kvtier.p2p.transport import Connection, Deadline

log = logging.getLogger(__name__)


class SameHostSharing:
    """What we share, who mapped it, what we mapped, for one :class:`~kvtier.p2p.service.PeerService`.

    Serving side: ``serve_gpu_open`` / ``serve_gpu_pin`` / ``serve_gpu_unpin`` answer a peer's
    requests, pins are leases that expire. Pulling side: :meth:`map_peer` maps a peer's pool once
    per incarnation, :meth:`pull_shared` copies leased pages into a load's frontier. ``lock``,
    ``counters`` and ``count_bad_peer`` are the service's; :meth:`start` hands over the
    connections, membership and thread pool that the service makes when it starts.
    """

    def __init__(
        self,
        config: PeerConfig,
        lock: threading.RLock,
        counters: Counter,
        pages_per_chunk: int,
        blob_bytes: int,
        count_bad_peer,
    ) -> None:
        self.config = config
        self._lock = lock
        self.counters = counters
        self._ppc = pages_per_chunk
        self._blob_bytes = blob_bytes
        self._count_bad_peer = count_bad_peer
        self._gpu: GpuShare | None = None
        self._gpu_exported = None  # our tensors as peers map them, made on the first GPU_OPEN
        self._gpu_peers: set[str] = set()  # node ids that mapped our pool
        self.maps: dict[str, tuple[int, tuple | None]] = {}  # node id -> (incarnation, map_peer's answer)
        self._leases = LeaseTable(self._unpin)
        self.host_id = host_id()
        self._client = self._m = self._exec = None

    def start(self, client, membership, executor) -> None:
        """The service's PeerClient, Membership and request thread pool, once it has started."""
        self._client, self._m, self._exec = client, membership, executor

    def share_gpu(self, share: GpuShare | None) -> None:
        with self._lock:
            self._gpu = share
            self._gpu_exported = None
            self.maps.clear()

    @property
    def active(self) -> bool:
        """Whether a pool is shared (``share_gpu``)."""
        return self._gpu is not None

    def holds(self, key: bytes) -> bool:
        """Whether our shared pool holds ``key``."""
        share = self._gpu
        return share is not None and share.pages is not None and share.pages.share_has(key)

    def pages_shared_with(self, peer_id: str):
        """Our pool's pages (``GpuShare.pages``) if ``peer_id`` mapped them, else None."""
        return self._gpu.pages if self._gpu is not None and peer_id in self._gpu_peers else None

    def serve_gpu_unpin(self, body: bytes) -> bool:
        """A peer's copy is done: release its lease; False if it had expired already."""
        return self._leases.release(P.decode_lease(body))

    def expire_leases(self, now: float) -> int:
        return self._leases.expire(now)

    def close(self) -> None:
        self._leases.release_all()

    def _unpin(self, keys: list[bytes]) -> None:
        share = self._gpu
        if share is not None and share.pages is not None:
            share.pages.share_unpin(keys)

    def map_peer(self, node_id: str, deadline: Deadline) -> tuple[object, int] | None:
        """``node_id``'s pool mapped here, as (its page copier into our pool, its page count), or
        None where it shares none with us (another host, no pool, a mapping that failed). Asked
        once per incarnation of the peer; a new incarnation's mapping replaces the old one."""
        share = self._gpu
        with self._lock:
            m = self._m.members.get(node_id)
            if m is None or share is None:
                return None
            inc, host, port = m.record.incarnation, m.record.host, m.record.port
            cached = self.maps.get(node_id)
            if cached is not None and cached[0] == inc:
                return cached[1]
        mapped = None
        try:
            _, body = self._client.exchange(
                host,
                port,
                P.Kind.GPU_OPEN,
                P.encode_gpu_open(self.host_id, (share.mechanism.name,)),
                deadline,
                P.Kind.GPU_HANDLES,
            )
            reply = P.GpuHandles.decode(body)
            if reply.ok:
                share.check_peer(list(reply.tensors), reply.page_dim)
                src = share.mechanism.open(list(reply.tensors))
                mapped = (
                    share.mechanism.copier(src, share.tensors, share.page_dim),
                    share.num_pages(list(reply.tensors)),
                )
                self.counters["gpu_maps"] += 1
            else:
                self.counters["gpu_maps_refused"] += 1
                log.info("kvtier p2p: %s shares no pool with us: %s", node_id, reply.reason)
        except P.ProtocolError:
            self._count_bad_peer(node_id)
            self.counters["protocol_errors"] += 1
        except (OSError, TimeoutError, DeadlineExceededError):
            return None  # unreachable now: ask again next time
        except (KVTierError, RuntimeError, ValueError) as e:  # the mapping itself failed
            self.counters["gpu_map_failures"] += 1
            log.info("kvtier p2p: cannot map %s's pool: %s", node_id, e)
        with self._lock:
            self.maps[node_id] = (inc, mapped)
        return mapped

    def pull_shared(self, src: str, addr, items: list[tuple[int, bytes]], deadline: Deadline, frontier) -> int:
        """Lease the leading ``items`` that ``src``'s pool holds, copy them page to page into the
        frontier's pages, release the lease. Returns how many leading items landed."""
        mapped = self.map_peer(src, deadline)
        if mapped is None:
            return 0
        copier, src_num_pages = mapped
        ppc = self._ppc
        try:
            t0 = time.monotonic()
            _, body = self._client.exchange(
                *addr, P.Kind.GPU_PIN, P.encode_keys([k for _, k in items]), deadline, P.Kind.GPU_PINNED
            )
            pin = P.GpuPinned.decode(body)
            lease_end = t0 + pin.lease_ms / 1000.0
        except P.ProtocolError:
            self._count_bad_peer(src)
            self.counters["protocol_errors"] += 1
            return 0
        except (OSError, KVTierError, TimeoutError):
            self.counters["gpu_pin_failures"] += 1
            return 0
        n = pin.chunks
        if n == 0:
            return 0
        if pin.pages_per_chunk != ppc or n > len(items) or max(pin.pages) >= src_num_pages:
            self._count_bad_peer(src)
            self.counters["protocol_errors"] += 1
            self._release_lease(addr, pin.lease_id, deadline)
            return 0
        idx = [i for i, _ in items[:n]]
        dst_pages = np.concatenate([frontier.pages[i * ppc : (i + 1) * ppc] for i in idx])
        if not frontier.begin_direct():
            self._release_lease(addr, pin.lease_id, deadline)
            return 0
        ok = False
        try:
            done = copier.copy(np.asarray(pin.pages, dtype=np.int64), dst_pages, frontier.stream)
            # Counted only if it ended while the lease held (a margin for clocks and the reply).
            budget = min(deadline.at, lease_end - 0.05) - time.monotonic()
            ok = done.wait(max(budget, 0.0))
        except (KVTierError, RuntimeError, ValueError) as e:
            log.info("kvtier p2p: shared copy from %s failed: %s", src, e)
        finally:
            frontier.end_direct(idx, ok)
        if not ok:
            self.counters["gpu_copy_failures"] += 1
            return 0  # the lease expires at the source; the copy may still be reading its pages
        # The copy has landed: the pages are ours. Release the lease in the background, not on
        # the request's path (a round trip of B's begin); one that never arrives expires.
        try:
            self._exec.submit(self._release_lease, addr, pin.lease_id, deadline)
        except RuntimeError:  # the service is closing: release here
            self._release_lease(addr, pin.lease_id, deadline)
        self.counters["gpu_chunks_copied"] += n
        self.counters["gpu_bytes_copied"] += n * self._blob_bytes
        return n

    def _release_lease(self, addr, lease_id: int, deadline: Deadline) -> None:
        try:
            self._client.exchange(
                *addr,
                P.Kind.GPU_UNPIN,
                P.encode_lease(lease_id),
                Deadline(max(deadline.remaining(), 0.5)),
                P.Kind.GPU_UNPINNED,
            )
        except (OSError, KVTierError, TimeoutError):
            self.counters["gpu_unpin_failures"] += 1  # the lease expires at the source

    def serve_gpu_open(self, conn: Connection, body: bytes) -> P.GpuHandles:
        host, mechanisms = P.decode_gpu_open(body)
        share = self._gpu
        if share is None or share.pages is None:
            return P.GpuHandles(False, "no shared pool here")
        if host != self.host_id:
            return P.GpuHandles(False, "another host")
        if share.mechanism.name not in mechanisms:
            return P.GpuHandles(False, f"pool shared through {share.mechanism.name!r}, peer maps {list(mechanisms)}")
        with self._lock:
            if self._gpu_exported is None:
                try:
                    self._gpu_exported = tuple(share.mechanism.export(share.tensors))
                except (KVTierError, RuntimeError) as e:
                    return P.GpuHandles(False, f"cannot export the pool: {e}"[:255])
            self._gpu_peers.add(conn.peer_id)
            exported = self._gpu_exported
        self.counters["gpu_opens_served"] += 1
        return P.GpuHandles(True, "", share.mechanism.name, share.page_dim, exported)

    def serve_gpu_pin(self, conn: Connection, keys: list[bytes]) -> P.GpuPinned:
        share = self._gpu
        lease_s = 2 * self.config.request_timeout_s
        if share is None or share.pages is None or conn.peer_id not in self._gpu_peers:
            return P.GpuPinned(0, 0, self._ppc, ())
        pages = share.pages.share_pin(keys)
        if not pages:
            return P.GpuPinned(0, 0, self._ppc, ())
        lease = self._leases.add(keys[: len(pages)], lease_s)
        self.counters["gpu_chunks_leased"] += len(pages)
        return P.GpuPinned(lease, int(lease_s * 1000), self._ppc, tuple(p for ps in pages for p in ps))
