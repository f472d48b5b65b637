"""PeerService: one member of a kvtier peer cluster, serving its CPU tier and pulling from others.

It runs beside a CpuTier (inside a KVCache, or in a standalone ``kvtier peer`` node) and owns:

- a TCP listener; each inbound connection is served by its own thread after the HMAC handshake
  (in TLS when ``tls_*`` are set), within the bounds of :class:`InboundSlots`
  (inbound_connections.py, inbound_slots.py; the answers: request_handlers.py);
- a gossip thread: one SWIM protocol period per ``gossip_interval_s`` (membership.py), this
  member's digest deltas, fetches of peers' digests that fell behind (gossip.py);
- a pool of authenticated client connections (peer_client.py) and a thread pool for concurrent
  requests;
- same-host page sharing, both ways (same_host.py).

The data path: :meth:`lookup` asks the digests which peers may hold the keys missing locally,
confirms with at most ``max_sources`` of them (one round trip, in parallel) and returns how many
leading chunks are available; :meth:`load` pulls them (several sources at once), each blob
received straight into a reserved pinned pool block (``begin_put`` / ``recv_into``), checked, then
committed (``commit_put``) or given back (``abort_put``); committed chunks are scattered to the
caller's pages in order while later ones are still on the wire (peer_pull.py, page_load.py).

Each part is an object the service makes and owns, handed what it uses (the service's lock,
counters, membership, digests, client) when it is made; none of them imports this module.

Thread safety: every public method may be called from any thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import random
import socket
import threading
import time
from collections import Counter

import numpy as np

from kvtier.errors import InvalidArgumentError, KVTierError, UnavailableError
from kvtier.p2p import protocol as P
from kvtier.p2p.auth import load_secret
from kvtier.p2p.config import PeerConfig, parse_address
from kvtier.p2p.digest import LocalDigest, PeerDigests, bloom_geometry
from kvtier.p2p.gossip import GossipDriver
from kvtier.p2p.gpu_share import GpuShare
from kvtier.p2p.inbound_connections import InboundConnections
from kvtier.p2p.inbound_slots import InboundSlots
from kvtier.p2p.key_journal import KeyJournal
from kvtier.p2p.membership import Membership, MembershipConfig
from kvtier.p2p.nixl_path import NixlPath
from kvtier.p2p.page_load import ChainedOp, ChainedTransfer, LoadFrontier
from kvtier.p2p.peer_client import PeerClient
from kvtier.p2p.peer_pull import LOCAL, PeerPuller
from kvtier.p2p.request_handlers import RequestHandlers
from kvtier.p2p.same_host import SameHostSharing
from kvtier.p2p.transport import Connection, ConnectionPool, Deadline, Identity

log = logging.getLogger(__name__)

_MAX_BAD_PEERS = 1024  # entries of PeerService.bad_peers; the least counted one makes room
_Frontier = LoadFrontier  # its name here before page_load.py (tests/test_p2p_share.py)

__all__ = ["LOCAL", "ChainedOp", "ChainedTransfer", "InboundSlots", "KeyJournal", "PeerService"]


class PeerService:
    """A member of the peer cluster for one CpuTier (one model and layout). Inside a serving
    process it is the cache's :class:`kvtier.sources.ChunkSource` (``KVCache(peers=...)``).

    Args:
        tier: the ``kvtier._core.CpuTier`` whose pool is served and filled.
        fingerprint: the layout fingerprint (16 bytes); peers must have the same one.
        config: :class:`PeerConfig`.
        promote: optional ``callable(key) -> bool`` bringing a disk-only chunk into the pool so it
            can be served (a standalone node has scratch pages for this); without it only pool
            chunks are served and a disk-only chunk is a miss to peers.
        journal_dir: where to keep the key journal (the disk tier's directory), or None.

    Example::

        svc = PeerService(cache.tier, layout.fingerprint, PeerConfig(secret=s, seeds=("10.0.0.1:7070",)))
        svc.start()
        svc.note_stored(keys)          # after a store: the chunks join this member's digest
        n = svc.lookup(keys[hit:])     # leading chunks peers hold (confirmed)
    """

    def __init__(
        self,
        tier,
        fingerprint: bytes,
        config: PeerConfig,
        *,
        promote=None,
        journal_dir: str | None = None,
        rng_seed: int | None = None,
    ) -> None:
        self.config = config
        self._tier = tier
        self._fingerprint = bytes(fingerprint)
        self._blob_bytes = int(tier.blob_bytes)
        self._ppc = int(tier.pages_per_chunk)
        self._secret = load_secret(config.secret, config.secret_file)
        self._promote = promote
        self._rng = random.Random(rng_seed)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self.counters: Counter = Counter()
        self.bad_peers: Counter = Counter()
        self._journal = KeyJournal(journal_dir) if journal_dir else None
        self._held: set[bytes] = set()
        self._plans: dict[tuple, tuple[float, list[str]]] = {}
        # Inbound connections (pending and admitted) -> the thread serving each; bounded by
        # the slots. _threads holds only the service's own long-lived threads.
        self._server_conns: dict[Connection, threading.Thread] = {}
        self._threads: list[threading.Thread] = []
        c = config
        self._slots = InboundSlots(
            c.max_connections, max(4, c.max_connections // 8), c.idle_timeout_s, c.scarce_idle_timeout_s
        )
        self._tls = c.tls()
        self._listener: socket.socket | None = None
        self._started = False
        self._closed = False
        self._last_rebuild = time.monotonic()
        self._puller: PeerPuller | None = None  # made in start(), with the other parts that need a membership
        self._nixl: NixlPath | None = None  # the NIXL data path, when started (transport auto / nixl)
        self.nixl_reason: str | None = "not started"  # why there is none (None: there is one)
        # Same-host page sharing (same_host.py): what we share, who mapped it, what we mapped.
        self._sharing = SameHostSharing(
            config, self._lock, self.counters, self._ppc, self._blob_bytes, self._count_bad_peer
        )

    def share_gpu(self, share: GpuShare | None) -> None:
        """Share pool pages with peers on this host (see gpu_share.py): ``share.pages`` leases
        ours to them, ``share.tensors`` receive what we pull from theirs. None: stop."""
        self._sharing.share_gpu(share)

    # The same-host sharing's state under the names tests and benches reach for.
    @property
    def _host_id(self) -> str:
        return self._sharing.host_id

    @_host_id.setter
    def _host_id(self, value: str) -> None:
        self._sharing.host_id = value

    @property
    def _gpu_maps(self) -> dict:
        return self._sharing.maps

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> PeerService:
        host, port = parse_address(self.config.listen, "peers.listen")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        lst = socket.socket(family, socket.SOCK_STREAM)
        try:
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lst.bind((host, port))
            lst.listen(128)
            lst.settimeout(0.2)
        except OSError as e:
            lst.close()
            raise KVTierError(f"peers.listen={self.config.listen!r}: cannot listen: {e}") from None
        self._listener = lst
        bound_port = lst.getsockname()[1]
        if self.config.advertise:
            adv_host, adv_port = parse_address(self.config.advertise, "peers.advertise")
        else:
            adv_host, adv_port = host, bound_port
            if adv_host in ("0.0.0.0", "::"):
                adv_host = socket.gethostbyname(socket.gethostname())
        self.address = (adv_host, adv_port)
        self.node_id = self.config.node_id or f"{adv_host}:{adv_port}"
        incarnation = time.time_ns() // 1_000_000  # a restart outranks the old record
        c = self.config
        self._mconfig = MembershipConfig(
            period_s=c.gossip_interval_s,
            ack_timeout_s=c.ack_timeout_s,
            indirect_probes=c.indirect_probes,
            suspicion_mult=c.suspicion_mult,
            dead_retention_s=c.dead_retention_s,
            sync_interval_s=c.sync_interval_s,
        )
        self._m = Membership(
            self.node_id, adv_host, adv_port, incarnation, self._mconfig, self._rng, now=time.monotonic()
        )
        bits, hashes = bloom_geometry(c.digest_capacity, c.digest_fp_rate)
        self._digest = LocalDigest(self.node_id, bits, hashes, generation=int(time.time()) & 0xFFFFFFFF)
        self._digests = PeerDigests()
        self._me = Identity(self.node_id, self._fingerprint, self._blob_bytes, self._secret)
        self._client = PeerClient(ConnectionPool(self._me, c.connect_timeout_s, tls=self._tls), self.counters)
        self._gossip_exec = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvtier-p2p-gossip")
        self._exec = cf.ThreadPoolExecutor(max_workers=max(8, 2 * c.max_sources), thread_name_prefix="kvtier-p2p-req")
        self._gossip = GossipDriver(
            c,
            self.address,
            self._m,
            self._digest,
            self._digests,
            self._client,
            self._gossip_exec,
            self._lock,
            self.counters,
            self._count_bad_peer,
        )
        self._m.on_delta = self._gossip.on_delta
        self._m.on_record = self._gossip.on_record
        self._sharing.start(self._client, self._m, self._exec)
        self._nixl = self._start_nixl()
        if self._nixl is not None:
            self._me.caps |= P.CAP_NIXL | P.CAP_NIXL_LATE_SUMS  # offered in every handshake from now on
        self._puller = PeerPuller(
            c,
            self._tier,
            self._fingerprint,
            self._m,
            self._digests,
            self._client,
            self._sharing,
            self._exec,
            self._lock,
            self.counters,
            self._count_bad_peer,
            self._rng,
            self.note_stored,
            self._nixl,
        )
        self._handlers = RequestHandlers(
            c,
            self._tier,
            self._fingerprint,
            self._promote,
            self._lock,
            self.counters,
            self._m,
            self._digest,
            self._client,
            self._sharing,
            self._nixl,
        )
        if self._journal is not None:
            self._restore_from_journal()
        self._inbound = InboundConnections(
            c,
            self._listener,
            self._tls,
            self._me,
            self._slots,
            self._server_conns,
            self._handlers,
            self._lock,
            self._stop,
            self.counters,
            self._count_bad_peer,
        )
        self._spawn(self._inbound.accept_loop, "kvtier-p2p-accept")
        self._spawn(self._gossip_loop, "kvtier-p2p-gossip")
        self._gossip.join_seeds()
        self._started = True
        return self

    def _start_nixl(self) -> NixlPath | None:
        """This member's NIXL side (transport auto/nixl), or None: pulls and serving use the TCP
        stream. ``auto`` without the nixl package (or with an agent that fails to start) logs why;
        ``nixl`` raises instead."""
        mode = self.config.transport
        if mode == "tcp":
            self.nixl_reason = "transport: tcp"
            return None
        try:
            path = NixlPath(
                self.config,
                self._tier,
                self.node_id,
                self._client,
                self._exec,
                self._lock,
                self.counters,
                self._count_bad_peer,
                self._promote,
            )
        except (UnavailableError, InvalidArgumentError) as e:
            if mode == "nixl":
                self.close()
                raise UnavailableError(f"peers.transport=nixl: {e}") from None
            self.nixl_reason = str(e)
            log.info("kvtier p2p: pulls use the TCP stream: %s", e)
            return None
        self.nixl_reason = None
        return path

    def _spawn(self, fn, name, *args) -> threading.Thread:
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def close(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if not self._started:
            if self._listener is not None:
                self._listener.close()
            return
        for t in self._threads:
            t.join(timeout_s)
        self._listener.close()
        with self._lock:
            conns = list(self._server_conns.items())
        for conn, _ in conns:
            conn.close()
        self._client.pool.close()
        self._gossip_exec.shutdown(wait=True, cancel_futures=True)
        self._exec.shutdown(wait=True, cancel_futures=True)
        for _, t in conns:
            t.join(timeout_s)
        self._sharing.close()
        if self._nixl is not None:
            self._nixl.close()
        if self._journal is not None:
            self._journal.close()

    def __enter__(self) -> PeerService:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- local digest --------------------------------------------------------------------------
    def note_stored(self, keys) -> None:
        """Chunks now held here (stored, pulled, or found at start): add them to the digest."""
        keys = [bytes(k) for k in keys]
        with self._lock:
            new = [k for k in keys if k not in self._held]
            self._held.update(new)
            self._digest.add(new)
        if new and self._journal is not None:
            self._journal.append(new)

    def _restore_from_journal(self) -> None:
        keys = self._journal.read()
        present = [k for k in dict.fromkeys(keys) if self._tier.lookup(k) > 0]
        self._journal.rewrite(present)
        self._held.update(present)
        self._digest.add(present)
        self.counters["journal_restored"] += len(present)

    def _rebuild_digest(self) -> None:
        with self._lock:
            held = list(self._held)
        present = [k for k in held if self._tier.lookup(k) > 0 or self._sharing.holds(k)]
        with self._lock:
            gone = set(held) - set(present)
            if not gone:
                return
            self._held -= gone
            self._digest.rebuild(self._held)
            self._m.set_digest_version(self._digest.generation, self._digest.version)
            self.counters["digest_rebuilds"] += 1
        if self._journal is not None:
            self._journal.rewrite(present)

    # -- threads -------------------------------------------------------------------------------
    def _gossip_loop(self) -> None:
        period = self.config.gossip_interval_s
        next_tick = time.monotonic()
        while not self._stop.wait(max(0.0, next_tick - time.monotonic())):
            next_tick += period
            try:
                self._tick()
            except Exception:  # a bug here must not silently stop failure detection
                log.exception("kvtier p2p: gossip tick failed")
                self.counters["tick_errors"] += 1

    def _tick(self) -> None:
        now = time.monotonic()
        self._gossip.tick(now)
        expired = self._sharing.expire_leases(now)
        if expired:
            self.counters["gpu_leases_expired"] += expired
        if self._nixl is not None:
            self._nixl.expire(now)
        self._inbound.close_idle(now)
        if now - self._last_rebuild >= self.config.digest_rebuild_s:
            self._last_rebuild = now
            self._gossip_exec.submit(self._rebuild_digest)

    # -- lookup and pull -----------------------------------------------------------------------
    def plan(self, keys: list[bytes], deadline: Deadline | None = None) -> list[str]:
        """Where each leading chunk of ``keys`` can come from: LOCAL ("") or a peer's node id,
        confirmed by that peer. Stops at the first chunk nobody confirmed. At most
        ``max_sources`` peers are asked, in one parallel round (a second round only for chunks
        whose candidates all turned out false positives), whatever the cluster size."""
        return self._puller.plan(keys, deadline)

    def pull_rate(self, min_bytes: int = 64 << 20) -> float | None:
        """Bytes/s of this service's completed pulls so far, over the TCP stream or NIXL (request
        to last byte in the CPU tier, checksums included), or None before ``min_bytes`` have come
        that way: the rate a planner prices chunks that peers hold at
        (``CostModelPlanner.calibrate``)."""
        if self._puller is None:  # not started: nothing pulled yet
            return None
        return self._puller.pull_rate(min_bytes)

    def pull(self, keys: list[bytes], plan: list[str], deadline: Deadline, on_commit=None, frontier=None) -> int:
        """Pull the chunks ``plan`` assigns to peers into the pool, from all sources at once.
        Returns how many were committed. ``on_commit(i)`` runs as chunk ``keys[i]`` lands. With
        a ``frontier`` (a load into pages), a source on this host that shares its pool copies
        the chunks it holds there straight into the frontier's pages."""
        return self._puller.pull(keys, plan, deadline, on_commit, frontier)

    def lookup(self, keys: list[bytes]) -> int:
        """How many leading chunks of ``keys`` (the part missing locally) peers confirm."""
        if not keys:
            return 0
        plan = self.plan(list(keys))
        if not plan:
            return 0
        with self._lock:  # a load of the chunks it found (from keys[0] on) takes this plan
            self._plans[(keys[0], len(plan))] = (time.monotonic() + 2.0, plan)
            if len(self._plans) > 256:
                now = time.monotonic()
                self._plans = {k: v for k, v in self._plans.items() if v[0] > now}
        return len(plan)

    def _cached_plan(self, keys: list[bytes]) -> list[str] | None:
        with self._lock:
            hit = self._plans.pop((keys[0], len(keys)), None)
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def load(self, keys: list[bytes], pages: np.ndarray, stream: int, timeout_s: float | None = None) -> ChainedOp:
        """Load the leading chunks of ``keys`` into ``pages``: local ones straight away, the rest
        pulled from peers (blocking until they land or the deadline passes), each scattered as
        soon as it and every chunk before it are in the pool. ``chunks`` of the result is the
        leading count in place once its transfer is waited on."""
        ppc = self._ppc
        wanted = min(len(keys), len(pages) // ppc)
        keys = list(keys[:wanted])
        op0 = self._tier.load(b"".join(keys), pages[: wanted * ppc], stream)
        hit = op0.chunks
        if hit == wanted or not self._m.members:
            return ChainedOp(hit, [op0])
        rest = keys[hit:]
        deadline = Deadline(timeout_s or self.config.request_timeout_s)
        plan = self._cached_plan(rest)
        if plan is None:
            plan = self.plan(rest, deadline)
        if not plan:
            return ChainedOp(hit, [op0])
        rest = rest[: len(plan)]
        frontier = LoadFrontier(self._tier, rest, pages[hit * ppc :], ppc, stream, plan)
        self.counters["pulls"] += 1
        self.pull(rest, plan, deadline, on_commit=frontier.commit, frontier=frontier)
        got = frontier.freeze()
        if got < len(plan):
            self.counters["pull_short"] += 1
        return ChainedOp(hit + got, [op0, *frontier.ops])

    # -- misbehaving peers ---------------------------------------------------------------------
    def _count_bad_peer(self, peer: str) -> None:
        bad = self.bad_peers
        if peer not in bad and len(bad) >= _MAX_BAD_PEERS:
            bad.pop(min(bad, key=bad.get, default=None), None)
        bad[peer] += 1

    # -- introspection -------------------------------------------------------------------------
    def members(self) -> dict[str, str]:
        """node id -> "alive" / "suspect" / "dead", as this member sees them."""
        with self._lock:
            return {k: P.STATE_NAMES[m.record.state] for k, m in self._m.members.items()}

    def digest_versions(self) -> dict[str, tuple[int, int] | None]:
        with self._lock:
            return {o: self._digests.version_of(o) for o in self._digests.owners()}

    def stats(self) -> dict:
        with self._lock:
            s = dict(self.counters)
            s.update(
                {
                    "node_id": self.node_id,
                    "address": f"{self.address[0]}:{self.address[1]}",
                    "members": {k: P.STATE_NAMES[m.record.state] for k, m in self._m.members.items()},
                    "incarnation": self._m.me.incarnation,
                    "digest": {
                        "generation": self._digest.generation,
                        "version": self._digest.version,
                        "keys": len(self._held),
                        "pending": self._digest.pending,
                        "bits": self._digest.filter.num_bits,
                    },
                    "peer_digests": len(self._digests.owners()),
                    "bad_peers": dict(self.bad_peers),
                    "membership": dict(self._m.counters),
                    "server_connections": len(self._server_conns),
                    "server_slots": self._slots.sizes(),
                    "tls": "off" if self._tls is None else ("mutual" if self._tls.mutual else "server"),
                    "journal_errors": self._journal.errors if self._journal is not None else 0,
                    "data_path": "tcp" if self._nixl is None else "nixl+tcp",
                    "nixl": self._nixl.stats() if self._nixl is not None else {"off": self.nixl_reason},
                }
            )
        return s
