"""NixlPath: pulled chunks move as one-sided NIXL READs of the holder's CPU-tier blocks.

The authenticated control channel carries what the READs need, never before the handshake:

1. ``NIXL_META_REQ`` -> ``NIXL_META`` (first pull from a peer): the holder's agent name (its node
   id, checked against the identity the connection authenticated), its agent metadata (loaded
   into this member's agent) and the address range of the region holding its blocks.
2. ``NIXL_LEASE keys`` -> ``NIXL_LEASED``: the holder pins the leading chunks it has (a reference
   on each block: not evicted, not rewritten) and answers each block's offset in the region and
   the CRC32C of its blob: the one its tier keeps for the block (``CpuTier.blob_checksum``: noted
   by whoever wrote or checked the bytes, else computed once at the first lease). The lease lasts
   ``2 * request_timeout_s``.
3. The puller reserves its own blocks (``begin_put``), READs the holder's blocks straight into
   them, stops before the lease expires, checks each blob's CRC32C and commits it (noting the
   checksum with the block, so this member serves it on without a pass over it); any other outcome
   aborts the blocks: a miss, never wrong KV.
4. ``NIXL_RELEASE lease_id`` (or expiry on the holder's gossip tick) drops the pins.

A peer whose metadata is refused, or whose READ fails (not a deadline), is pulled over the TCP
stream from then on (until its metadata is fetched again after it is lost).
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import os
import socket
import threading
import time
from collections import Counter

import numpy as np

from kvtier import _core
from kvtier.errors import AlreadyExistsError, InvalidArgumentError, KVTierError, ResourceExhaustedError
from kvtier.p2p import protocol as P
from kvtier.p2p.config import PeerConfig
from kvtier.p2p.nixl_agent import DEFAULT_MAX_POST_BYTES, FAILED, PEER_LOST, NixlEndpoint
from kvtier.p2p.peer_client import PeerClient
from kvtier.p2p.transport import Deadline

log = logging.getLogger(__name__)

# A READ must end this long before the holder's lease does: the lease is timed from the holder's
# reply, the READ's deadline from its arrival here.
LEASE_MARGIN_S = 0.05
# Threads checksumming blobs (crc32c releases the GIL): a lease's and a READ's blobs are checked
# in parallel, since one core checksums slower than a fast link moves bytes.
CHECKSUM_THREADS = min(4, os.cpu_count() or 1)
# Ask holders that offer it for late leases (their checksums computed while the READs run).
LATE_CHECKSUMS = True


def _addr(view) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def _is_this_host(host: str) -> bool:
    """Whether ``host`` names this machine: an address of it binds."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind((sockaddr[0], 0))
            return True
        except OSError:
            continue
    return False


def _has_rdma_device(sysfs: str = "/sys/class/infiniband") -> bool:
    try:
        return bool(os.listdir(sysfs))
    except OSError:
        return False


def nixl_pays(host: str) -> bool:
    """Whether NIXL should move a peer's chunks faster than the TCP stream: the peer is on this
    host (UCX moves the bytes through shared memory, cma) or this machine has an RDMA device
    (UCX's rc/dc/EFA transports). Between hosts over plain TCP, UCX emulates a READ with messages
    and moved under a third of what the stream moves (docs/nixl.md), so ``transport: auto``
    keeps the stream there."""
    return _is_this_host(host) or _has_rdma_device()


def _release_views(views: list[memoryview]) -> None:
    for view in views:
        view.release()


class _Peer:
    """What this member knows of one holder's NIXL side (``late_sums``: it offers late leases)."""

    __slots__ = ("agent", "late_sums", "region_addr", "region_bytes")

    def __init__(self, agent: str, region_addr: int, region_bytes: int) -> None:
        self.agent, self.region_addr, self.region_bytes = agent, region_addr, region_bytes
        self.late_sums = False


class _PullSums:
    """The puller's side of a lease's checksums: those the reply named, and the late ones once
    ``future`` (NIXL_SUMS: the list, or None when they did not come) has answered."""

    def __init__(self, leased: P.NixlLeased, future: cf.Future | None) -> None:
        self._crcs = [crc for _, crc in leased.blocks]
        self._late = leased.late
        self._future = future

    def ready(self, j: int) -> bool:
        return not self._is_late(j) or self._future.done()

    def get(self, j: int, timeout_s: float) -> int | None:
        """Block ``j``'s CRC32C, waiting up to ``timeout_s`` for a late one; None if it did not come."""
        if not self._is_late(j):
            return self._crcs[j]
        try:
            crcs = self._future.result(timeout=max(0.0, timeout_s))
        except (cf.TimeoutError, cf.CancelledError):
            return None
        return None if crcs is None else crcs[j]

    def _is_late(self, j: int) -> bool:
        return bool(self._late) and self._late[j] and self._future is not None


class _Lease:
    """One lease: its expiry, the keys it pins, and (a late lease) the CRC32C of each block, with
    the checksums still being computed (index -> future) and the views they read."""

    __slots__ = ("at", "crcs", "keys", "pending", "views")

    def __init__(self, at: float, keys: list[bytes], crcs: list[int], pending: dict, views: list) -> None:
        self.at, self.keys, self.crcs, self.pending, self.views = at, keys, crcs, pending, views


class BlockLeases:
    """The holder's leases: CPU-tier blocks pinned for pullers' one-sided READs (a reference on
    each, so the tier neither evicts nor rewrites them) until released or expired. ``region_addr``
    / ``region_bytes``: the registered range every leased block must lie in. With ``crc_pool``, a
    late lease (``lease(..., late=True)``) answers at once and computes the checksums the tier
    does not keep there, while the puller READs (:meth:`sums`)."""

    def __init__(
        self,
        tier,
        region_addr: int,
        region_bytes: int,
        lease_s: float,
        counters: Counter,
        promote=None,
        checksums=None,
        crc_pool: cf.Executor | None = None,
    ) -> None:
        self._tier = tier
        # Each held block's CRC32C: the tier's kept one, or computed (and kept) there.
        self._checksums = checksums or (lambda views: [tier.blob_checksum(v) for v in views])
        self._crc_pool = crc_pool
        self._promote = promote  # a standalone node's: bring a disk-only chunk into the pool first
        self._blob_bytes = int(tier.blob_bytes)
        self._region_addr, self._region_bytes = region_addr, region_bytes
        self.lease_s = lease_s
        self.counters = counters
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._leases: dict[int, _Lease] = {}

    def lease(self, keys: list[bytes], now: float | None = None, late: bool = False) -> P.NixlLeased:
        """Pin the leading chunks of ``keys`` held in the tier; each one's offset and CRC32C. With
        ``late`` (and a checksum pool), a checksum the tier does not keep is marked late in the
        reply and computed on the pool (:meth:`sums` answers it)."""
        pinned: list[bytes] = []
        offsets: list[int] = []
        views: list[memoryview] = []
        pending: dict[int, cf.Future] = {}
        try:
            for key in keys:
                got = self._tier.acquire_blobs(key)
                if not got and self._promote is not None and self._tier.lookup(key) > 0 and self._promote(key):
                    got = self._tier.acquire_blobs(key)
                if not got:
                    break
                view = got[0]
                offset = _addr(view) - self._region_addr
                if not (offset >= 0 and offset + self._blob_bytes <= self._region_bytes):
                    # not a block of the registered arena: nothing a READ could reach
                    view.release()
                    del got
                    self._tier.release_blobs(key)
                    break
                pinned.append(key)
                offsets.append(offset)
                views.append(view)
            if late and self._crc_pool is not None:
                crcs = [self._tier.kept_blob_checksum(v) for v in views]
                for j, crc in enumerate(crcs):
                    if crc is None:
                        pending[j] = self._crc_pool.submit(self._tier.blob_checksum, views[j])
            else:
                crcs = self._checksums(views) if views else []
        except BaseException:
            _settle(pending)
            _release_views(views)
            self._unpin(pinned)
            raise
        if not pending:
            _release_views(views)
            views = []
        late_bits = tuple(j in pending for j in range(len(pinned))) if late else ()
        blocks = tuple(zip(offsets, [0 if c is None else c for c in crcs]))
        lease_id = next(self._ids)
        if pinned:
            at = (time.monotonic() if now is None else now) + self.lease_s
            with self._lock:
                self._leases[lease_id] = _Lease(at, pinned, crcs, pending, views)
            self.counters["nixl_leases"] += 1
            self.counters["nixl_chunks_leased"] += len(pinned)
            self.counters["nixl_checksums_late"] += len(pending)
        return P.NixlLeased(lease_id, int(self.lease_s * 1000), blocks, late_bits)

    def sums(self, lease_id: int, timeout_s: float) -> list[int] | None:
        """The CRC32C of each block of a live lease (NIXL_SUMS_REQ), waiting up to ``timeout_s``
        for those still being computed; None if the lease is gone or they are not done by then."""
        with self._lock:
            lease = self._leases.get(lease_id)
        if lease is None:
            return None
        done, not_done = cf.wait(list(lease.pending.values()), timeout=timeout_s)
        if not_done or any(f.cancelled() or f.exception() is not None for f in done):
            self.counters["nixl_checksums_not_ready"] += 1
            return None
        return [lease.pending[j].result() if j in lease.pending else c for j, c in enumerate(lease.crcs)]

    def release(self, lease_id: int) -> bool:
        """Drop a lease's pins (NIXL_RELEASE); False if it had expired or never existed."""
        with self._lock:
            lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        self._drop(lease)
        return True

    def expire(self, now: float) -> int:
        """Drop the leases past their expiry (the gossip tick); how many."""
        with self._lock:
            gone = [i for i, lease in self._leases.items() if lease.at <= now]
            leases = [self._leases.pop(i) for i in gone]
        for lease in leases:
            self._drop(lease)
        self.counters["nixl_leases_expired"] += len(leases)
        return len(leases)

    def held(self) -> int:
        with self._lock:
            return len(self._leases)

    def close(self) -> None:
        with self._lock:
            leases = list(self._leases.values())
            self._leases.clear()
        for lease in leases:
            self._drop(lease)

    def _drop(self, lease: _Lease) -> None:
        """Unpin a lease's blocks once no checksum reads them any more."""
        _settle(lease.pending)
        _release_views(lease.views)
        self._unpin(lease.keys)

    def _unpin(self, keys: list[bytes]) -> None:
        for key in keys:
            self._tier.release_blobs(key)


def _settle(pending: dict) -> None:
    """Cancel the checksums not started and wait for the running ones (each is one pass over a
    blob: bounded), so nothing reads a block once it is unpinned."""
    for f in pending.values():
        f.cancel()
    cf.wait(list(pending.values()))


class NixlPath:
    """One member's NIXL side: an agent named by ``node_id`` with ``tier``'s arena registered,
    the leases it holds for pullers, and the peers it READs from. ``lock``, ``counters`` and
    ``count_bad_peer`` are the service's; ``client`` and ``executor`` carry control requests;
    ``promote`` (a standalone node's) brings a disk-only chunk into the pool before it is leased."""

    def __init__(
        self,
        config: PeerConfig,
        tier,
        node_id: str,
        client: PeerClient,
        executor: cf.ThreadPoolExecutor,
        lock: threading.RLock,
        counters: Counter,
        count_bad_peer,
        promote=None,
    ) -> None:
        self.config = config
        self._tier = tier
        self._node_id = node_id
        self._blob_bytes = int(tier.blob_bytes)
        self._client = client
        self._exec = executor
        self._lock = lock
        self.counters = counters
        self._count_bad_peer = count_bad_peer
        # The holder's side must answer READs that UCX over TCP emulates: NIXL's progress thread.
        self._ep = NixlEndpoint(node_id, progress_thread=True)
        self._ep_lock = threading.Lock()  # NixlEndpoint: one caller at a time
        addr, nbytes = tier.arena_region
        self._region_addr, self._region_bytes = int(addr), int(nbytes)
        self._region = self._ep.register(self._region_addr, self._region_bytes)
        lease_s = 2 * config.request_timeout_s
        self._crc_pool = cf.ThreadPoolExecutor(CHECKSUM_THREADS, thread_name_prefix="kvtier-nixl-crc")
        # NIXL_SUMS_REQ of late leases, beside the READs (not on the service's pull workers).
        self._sums_exec = cf.ThreadPoolExecutor(4, thread_name_prefix="kvtier-nixl-sums")
        self.leases = BlockLeases(
            tier, self._region_addr, self._region_bytes, lease_s, counters, promote, self._checksums, self._crc_pool
        )
        self._peers: dict[str, _Peer | None] = {}  # node id -> its NIXL side, None: TCP only
        self._closed = False

    def _checksums(self, views: list) -> list[int]:
        """The CRC32C of each held blob: the tier's kept one, and where the tier has none, computed
        there in parallel (``blob_checksum`` releases the GIL)."""
        checksum = self._tier.blob_checksum
        if len(views) > 1:
            try:
                return list(self._crc_pool.map(checksum, views))
            except RuntimeError:  # the pool is shut down (closing): checksum here
                pass
        return [checksum(v) for v in views]

    # -- the holder's side ---------------------------------------------------------------------
    def meta(self) -> P.NixlMeta:
        """NIXL_META for a puller."""
        with self._ep_lock:
            metadata = self._ep.metadata()
        return P.NixlMeta(True, "", self._node_id, metadata, self._region_addr, self._region_bytes)

    def lease(self, keys: list[bytes], late: bool = False) -> P.NixlLeased:
        return self.leases.lease(keys, late=late)

    def sums(self, lease_id: int, timeout_s: float) -> list[int] | None:
        return self.leases.sums(lease_id, timeout_s)

    def release(self, lease_id: int) -> bool:
        return self.leases.release(lease_id)

    def expire(self, now: float) -> int:
        return self.leases.expire(now)

    # -- the puller's side ---------------------------------------------------------------------
    def _peer(self, src: str, addr: tuple[str, int], deadline: Deadline) -> _Peer | None:
        """The holder's NIXL side, fetched and loaded on first use; None: pull it over TCP (it did
        not offer NIXL in the handshake, or what it sent was refused)."""
        with self._lock:
            if src in self._peers:
                return self._peers[src]
        peer = None
        conn = None
        try:
            conn, _ = self._client.checkout(*addr, deadline)
            if conn.peer_id != src:
                raise P.ProtocolError(f"member {src!r} answered as {conn.peer_id!r}")
            if self.config.transport == "auto" and not nixl_pays(addr[0]):
                self.counters["nixl_peers_stream_faster"] += 1
            elif conn.peer_caps & P.CAP_NIXL:
                _, body = conn.request(P.Kind.NIXL_META_REQ, self._client.next_rid(), b"", deadline, P.Kind.NIXL_META)
                peer = self._load_peer(src, P.NixlMeta.decode(body))
                if peer is not None:
                    peer.late_sums = bool(conn.peer_caps & P.CAP_NIXL_LATE_SUMS)
            else:
                self.counters["nixl_peers_tcp_only"] += 1
            self._client.pool.put(conn)
            conn = None
        except (P.ProtocolError, InvalidArgumentError) as e:
            peer = None
            self.counters["nixl_peers_refused"] += 1
            self._count_bad_peer(src)
            log.info("kvtier p2p: NIXL side of %s refused (%s): TCP stream", src, e)
        except (OSError, KVTierError, TimeoutError):
            self.counters["nixl_meta_failures"] += 1
            return None  # not answered: asked again on the next pull
        finally:
            if conn is not None:
                conn.close()
        with self._lock:
            self._peers[src] = peer
        return peer

    def _load_peer(self, src: str, meta: P.NixlMeta) -> _Peer | None:
        """Load an offered NIXL side into this member's agent (ProtocolError / InvalidArgumentError
        when it is not the peer's own or NIXL refuses it); None when the peer offers none."""
        if not meta.ok:
            self.counters["nixl_peers_tcp_only"] += 1
            log.info("kvtier p2p: %s offers no NIXL (%s): TCP stream", src, meta.reason)
            return None
        if meta.agent != src:
            raise P.ProtocolError(f"NIXL agent {meta.agent!r} is not the member {src!r}")
        with self._ep_lock:
            self._ep.remove_peer(src)  # a restarted member: its old metadata goes first
            try:
                name = self._ep.add_peer(meta.metadata)
            except InvalidArgumentError:
                self._ep.remove_peer(src)  # a refused load can leave the name half-known
                raise
            if name != src:
                self._ep.remove_peer(name)
                raise P.ProtocolError(f"NIXL metadata of agent {name!r} from member {src!r}")
        return _Peer(src, meta.region_addr, meta.region_bytes)

    def transport_of(self, src: str) -> str:
        """ "nixl", "tcp" or "unknown" (not pulled from yet) for a peer."""
        with self._lock:
            if src not in self._peers:
                return "unknown"
            return "tcp" if self._peers[src] is None else "nixl"

    def _forget(self, src: str, tcp_only: bool) -> None:
        with self._ep_lock:
            self._ep.remove_peer(src)
        with self._lock:
            if tcp_only:
                self._peers[src] = None
            else:
                self._peers.pop(src, None)  # fetched again on the next pull

    def pull(
        self,
        src: str,
        addr: tuple[str, int],
        items: list[tuple[int, bytes]],
        deadline: Deadline,
        on_commit,
        note_stored,
    ) -> int | None:
        """Pull ``items`` [(plan index, key)] from ``src`` over NIXL: chunks committed, or None
        when this peer is pulled over the TCP stream instead (nothing was asked of it)."""
        peer = self._peer(src, addr, deadline)
        if peer is None:
            return None
        late = peer.late_sums and LATE_CHECKSUMS
        K = P.Kind
        ask, reply = (K.NIXL_LEASE_LATE, K.NIXL_LEASED_LATE) if late else (K.NIXL_LEASE, K.NIXL_LEASED)
        try:
            _, body = self._client.exchange(*addr, ask, P.encode_keys([k for _, k in items]), deadline, reply)
            leased = P.NixlLeased.decode_late(body) if late else P.NixlLeased.decode(body)
        except P.ProtocolError:
            self.counters["protocol_errors"] += 1
            self._count_bad_peer(src)
            return 0
        except (OSError, KVTierError, TimeoutError):
            self.counters["pull_failures"] += 1
            return 0
        lease_end = time.monotonic() + leased.lease_ms / 1000 - LEASE_MARGIN_S
        # The late checksums are asked for at once: the holder computes them while the READs run.
        fetch = self._sums_exec.submit(self._fetch_sums, src, addr, leased, deadline) if any(leased.late) else None
        sums = _PullSums(leased, fetch)
        try:
            return self._read_leased(
                src, peer, items[: len(leased.blocks)], leased, sums, deadline, lease_end, on_commit, note_stored
            )
        finally:
            if leased.blocks:
                self._exec.submit(self._release, addr, leased.lease_id)
            self.counters["chunks_missed_at_source"] += len(items) - len(leased.blocks)

    def _fetch_sums(self, src: str, addr: tuple, leased: P.NixlLeased, deadline: Deadline) -> list[int] | None:
        """NIXL_SUMS_REQ for a late lease: its checksums, or None (counted) when they do not come."""
        try:
            _, body = self._client.exchange(
                *addr, P.Kind.NIXL_SUMS_REQ, P.encode_lease(leased.lease_id), deadline, P.Kind.NIXL_SUMS
            )
            crcs = P.decode_sums(body, len(leased.blocks))
        except P.ProtocolError:
            self.counters["protocol_errors"] += 1
            self._count_bad_peer(src)
            return None
        except (OSError, KVTierError, TimeoutError):
            self.counters["nixl_sums_failures"] += 1
            return None
        if crcs is None:
            self.counters["nixl_sums_not_given"] += 1
        return crcs

    def _read_leased(self, src, peer, items, leased, sums, deadline, lease_end, on_commit, note_stored) -> int:
        blob = self._blob_bytes
        reserved: list[tuple[int, bytes, memoryview, int]] = []  # (plan index, key, view, lease index)
        pieces: list[tuple[int, int, int]] = []
        committed = 0
        checks: list[cf.Future] = []
        try:
            for j, ((i, key), (offset, _crc)) in enumerate(zip(items, leased.blocks)):
                if offset + blob > peer.region_bytes:
                    raise P.ProtocolError(f"leased block at offset {offset} outside the peer's region")
                try:
                    view = self._tier.begin_put(key)
                except (AlreadyExistsError, ResourceExhaustedError) as e:
                    if isinstance(e, AlreadyExistsError) and on_commit is not None:
                        on_commit(i)  # arrived meanwhile
                    continue
                reserved.append((i, key, view, j))
                pieces.append((peer.region_addr + offset, _addr(view), blob))
            if not pieces:
                return 0
            # One READ per group of blocks; each group's blobs are checksummed on the pool while
            # the next group moves, and committed (and handed to on_commit) in order as soon as
            # their checksums match, so a load scatters early chunks while later ones arrive.
            per_group = max(1, DEFAULT_MAX_POST_BYTES // blob)
            failed = forget = False
            with self._ep_lock:
                for g in range(0, len(pieces), per_group):
                    budget = min(deadline.at, lease_end) - time.monotonic()
                    if budget <= 0:
                        self.counters["pull_deadline_misses"] += 1
                        failed = True
                        break
                    out = self._ep.read(src, pieces[g : g + per_group], budget)
                    if not out.ok:
                        self.counters[f"nixl_reads_{out.status}"] += 1
                        log.info("kvtier p2p: NIXL read from %s ended %s: %s", src, out.status, out.detail)
                        # Removing the peer disconnects it: no late bytes land in blocks handed back.
                        forget = out.status in (PEER_LOST, FAILED) or out.stuck
                        failed = True
                        break
                    first = len(checks) - committed  # reserved[first:] were just read
                    checks += [self._check(view) for _, _, view, _ in reserved[first : first + per_group]]
                    n, bad = self._commit_checked(
                        src, reserved, checks, sums, deadline, committed, note_stored, on_commit, False
                    )
                    committed += n
                    if bad:
                        return committed
            if forget:
                self._forget(src, tcp_only=out.status == FAILED)
            if not failed:
                self.counters["nixl_reads_done"] += 1
            # Groups read before a failure are whole: their checksums decide as for the others.
            n, _ = self._commit_checked(src, reserved, checks, sums, deadline, committed, note_stored, on_commit, True)
            return committed + n
        except P.ProtocolError:
            self.counters["protocol_errors"] += 1
            self._count_bad_peer(src)
            return committed
        finally:
            for check in checks:  # a blob still being checksummed is in use: wait before aborting it
                check.cancel()
            cf.wait(checks)
            for _i, key, view, _crc in reserved:  # not committed: a miss, never wrong KV
                view.release()
                self._tier.abort_put(key)

    def _check(self, view) -> cf.Future:
        """The CRC32C of a landed blob, computed on the checksum pool (here once it is shut down)."""
        try:
            return self._crc_pool.submit(_core.crc32c, view)
        except RuntimeError:
            done: cf.Future = cf.Future()
            done.set_result(_core.crc32c(view))
            return done

    def _commit_checked(
        self, src, reserved, checks, sums, deadline, start, note_stored, on_commit, wait: bool
    ) -> tuple[int, bool]:
        """Commit, in order, the reserved blobs whose checksum is known and matches the holder's;
        stop at the first one still being checked or whose late checksum has not come (unless
        ``wait``: then until the deadline), or not matching or not given (then True: that blob
        and the rest are misses, aborted by the caller). ``checks[start + n]`` belongs to
        ``reserved[n]``; committed entries leave ``reserved``. Returns (committed, stopped)."""
        committed = 0
        while reserved and start + committed < len(checks):
            check = checks[start + committed]
            i, key, view, j = reserved[0]
            if not wait and not (check.done() and sums.ready(j)):
                break
            crc = sums.get(j, deadline.at - time.monotonic())
            if crc is None:  # the holder's checksum did not come: nothing to check against
                self.counters["nixl_checksums_missing"] += 1
                return committed, True
            if check.result() != crc:
                # Not the bytes the holder leased.
                self.counters["checksum_failures"] += 1
                self._count_bad_peer(src)
                return committed, True
            reserved.pop(0)
            self._tier.note_blob_checksum(view, crc)  # checked: serving it on needs no pass
            view.release()
            self._tier.commit_put(key)
            committed += 1
            self.counters["chunks_pulled"] += 1
            self.counters["chunks_pulled_nixl"] += 1
            self.counters["bytes_pulled"] += self._blob_bytes
            note_stored([key])
            if on_commit is not None:
                on_commit(i)
        return committed, False

    def _release(self, addr: tuple[str, int], lease_id: int) -> None:
        try:
            self._client.exchange(
                *addr,
                P.Kind.NIXL_RELEASE,
                P.encode_lease(lease_id),
                Deadline(self.config.request_timeout_s),
                P.Kind.NIXL_RELEASED,
            )
        except (OSError, KVTierError, TimeoutError, P.ProtocolError):
            self.counters["nixl_release_failures"] += 1  # the holder's expiry drops it

    def stats(self) -> dict:
        with self._lock:
            peers = {k: ("tcp" if v is None else "nixl") for k, v in self._peers.items()}
        return {"agent": self._node_id, "leases_held": self.leases.held(), "peers": peers}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sums_exec.shutdown(wait=True, cancel_futures=True)
        self.leases.close()
        self._crc_pool.shutdown(wait=True)
        with self._ep_lock:
            self._ep.close()
