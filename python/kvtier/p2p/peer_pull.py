"""PeerPuller: the client side of the data path: which peers hold a run of keys (their digests,
confirmed by at most ``max_sources`` of them), and pulling those chunks into the pool."""

from __future__ import annotations

import concurrent.futures as cf
import random
import threading
import time
from collections import Counter

from kvtier.errors import AlreadyExistsError, DeadlineExceededError, KVTierError, ResourceExhaustedError
from kvtier.p2p import protocol as P
from kvtier.p2p.config import PeerConfig
from kvtier.p2p.digest import PeerDigests, assemble_plan, choose_sources
from kvtier.p2p.membership import Membership
from kvtier.p2p.peer_client import PeerClient
from kvtier.p2p.same_host import SameHostSharing
from kvtier.p2p.transport import Deadline

LOCAL = ""  # plan entry: the chunk is in a local tier already


class PeerPuller:
    """Lookups and pulls of a :class:`~kvtier.p2p.service.PeerService`: :meth:`plan` asks the
    ``digests`` which live members may hold the keys and confirms with them in parallel on the
    ``executor``; :meth:`pull` receives each blob straight into a reserved block of ``tier``'s
    pool (or lets ``sharing`` copy it from a same-host peer's pages) and reports it to
    ``note_stored``. ``lock``, ``counters``, ``count_bad_peer`` and ``rng`` are the service's."""

    def __init__(
        self,
        config: PeerConfig,
        tier,
        fingerprint: bytes,
        membership: Membership,
        digests: PeerDigests,
        client: PeerClient,
        sharing: SameHostSharing,
        executor: cf.ThreadPoolExecutor,
        lock: threading.RLock,
        counters: Counter,
        count_bad_peer,
        rng: random.Random,
        note_stored,
        nixl=None,
    ) -> None:
        self.config = config
        self._tier = tier
        self._fingerprint = fingerprint
        self._blob_bytes = int(tier.blob_bytes)
        self._m = membership
        self._digests = digests
        self._client = client
        self._sharing = sharing
        self._exec = executor
        self._lock = lock
        self.counters = counters
        self._count_bad_peer = count_bad_peer
        self._rng = rng
        self._note_stored = note_stored
        self._nixl = nixl  # a NixlPath: peers that offer NIXL are READ from, the others streamed
        self._pulled = [0, 0.0]  # bytes committed by completed pulls, and their seconds

    def _addr_of(self, node_id: str) -> tuple[str, int] | None:
        with self._lock:
            m = self._m.members.get(node_id)
            if m is None or m.record.state == P.DEAD:
                return None
            return m.record.host, m.record.port

    def _confirm(self, node_id: str, keys: list[bytes], deadline: Deadline) -> list[bool]:
        addr = self._addr_of(node_id)
        if addr is None:
            return [False] * len(keys)
        self.counters["confirm_requests"] += 1
        if self._sharing.active:
            self._sharing.map_peer(node_id, deadline)  # first contact: map its pool (it then confirms GPU chunks too)
        try:
            _, body = self._client.exchange(*addr, P.Kind.CONFIRM, P.encode_keys(keys), deadline, P.Kind.CONFIRM_REPLY)
            return P.decode_bitmap(body, len(keys))
        except P.ProtocolError:
            self._count_bad_peer(node_id)
            self.counters["protocol_errors"] += 1
        except (OSError, KVTierError, TimeoutError):
            self.counters["confirm_failures"] += 1
        return [False] * len(keys)

    def plan(self, keys: list[bytes], deadline: Deadline | None = None) -> list[str]:
        """Where each leading chunk of ``keys`` can come from (PeerService.plan)."""
        if deadline is None:
            deadline = Deadline(self.config.request_timeout_s)
        keys = keys[: self.config.max_request_chunks]
        n = len(keys)
        local = [self._tier.lookup(k) > 0 for k in keys]
        with self._lock:
            alive = self._m.candidate_ids()
            cands = self._digests.candidates(keys, alive)
        confirmed: dict[str, set[int]] = {}
        asked: set[str] = set()
        plan: list[str] = []
        for _round in range(2):  # the second only for chunks whose candidates were all false
            asks = choose_sources(len(plan), local, cands, self.config.max_sources, asked, self._rng)
            if not asks:
                break
            futs = {m: self._exec.submit(self._confirm, m, [keys[j] for j in idx], deadline) for m, idx in asks.items()}
            for m, f in futs.items():
                try:
                    bits = f.result(timeout=max(deadline.at - time.monotonic(), 0.0) + 0.5)
                except (cf.TimeoutError, cf.CancelledError):
                    bits = [False] * len(asks[m])
                confirmed[m] = {j for j, ok in zip(asks[m], bits) if ok}
                self.counters["confirm_false_positives"] += sum(1 for ok in bits if not ok)
            asked |= set(asks)
            plan = assemble_plan(local, confirmed)
            if len(plan) == n or deadline.expired():
                break
        self.counters["lookups"] += 1
        self.counters["lookup_chunks_found"] += sum(1 for s in plan if s != LOCAL)
        return plan

    def pull_rate(self, min_bytes: int = 64 << 20) -> float | None:
        """Bytes/s of the completed pulls (TCP stream or NIXL), or None below ``min_bytes``
        (PeerService.pull_rate)."""
        with self._lock:
            nbytes, seconds = self._pulled
        if nbytes < min_bytes or seconds <= 0:
            return None
        return nbytes / seconds

    def _note_rate(self, nbytes: int, seconds: float) -> None:
        with self._lock:  # the pulls' rate, for planners (pull_rate)
            self._pulled[0] += nbytes
            self._pulled[1] += seconds

    def pull(self, keys: list[bytes], plan: list[str], deadline: Deadline, on_commit=None, frontier=None) -> int:
        """Pull the chunks ``plan`` assigns to peers into the pool (PeerService.pull)."""
        by_source: dict[str, list[tuple[int, bytes]]] = {}
        for i, src in enumerate(plan):
            if src != LOCAL:
                by_source.setdefault(src, []).append((i, keys[i]))
        futs = [
            self._exec.submit(self._pull_from, src, items, deadline, on_commit, frontier)
            for src, items in by_source.items()
        ]
        done, not_done = cf.wait(futs, timeout=max(deadline.at - time.monotonic(), 0.0) + 1.0)
        if not_done:
            self.counters["pull_stragglers"] += len(not_done)
        return sum(f.result() for f in done)

    def _pull_from(self, src: str, items: list[tuple[int, bytes]], deadline: Deadline, on_commit, frontier=None) -> int:
        addr = self._addr_of(src)
        if addr is None:
            self.counters["chunks_pull_failed"] += len(items)
            return 0
        committed = 0
        if frontier is not None and self._sharing.active:
            done = self._sharing.pull_shared(src, addr, items, deadline, frontier)
            committed, items = done, items[done:]
            if not items:
                return committed
        if self._nixl is not None:
            t0 = time.monotonic()
            got = self._nixl.pull(src, addr, items, deadline, on_commit, self._note_stored)
            if got is not None:  # pulled over NIXL (what it did not bring is a miss)
                self.counters["chunks_pull_failed"] += len(items) - got
                if got:
                    self._note_rate(got * self._blob_bytes, time.monotonic() - t0)
                return committed + got
        conn = None
        scratch = None
        t0, pulled0 = time.monotonic(), committed
        try:
            conn, _ = self._client.checkout(*addr, deadline)
            rid = self._client.next_rid()
            conn.send_frame(P.Kind.GET, rid, P.encode_keys([k for _, k in items]), deadline)
            for i, key in items:
                h, body = conn.recv_frame(deadline, P.Kind.BLOB, P.Kind.MISS)
                if h.request_id != rid:
                    raise P.ProtocolError(f"frame for request {h.request_id}, expected {rid}")
                if h.kind == P.Kind.MISS:
                    if body != key:
                        raise P.ProtocolError("MISS for a key not asked for")
                    self.counters["chunks_missed_at_source"] += 1
                    continue
                k, fp, length, algo = P.decode_blob_meta(body)
                if k != key or fp != self._fingerprint:
                    raise P.ProtocolError("BLOB for a key or layout not asked for")
                if length != self._blob_bytes:
                    raise P.ProtocolError(f"BLOB of {length} bytes, blobs here are {self._blob_bytes}")
                try:
                    view = self._tier.begin_put(key)
                except (AlreadyExistsError, ResourceExhaustedError) as e:
                    # Arrived meanwhile (or no free block): read past it, keep the stream aligned.
                    if scratch is None:
                        scratch = bytearray(1 << 20)
                    conn.drain_payload(length, algo, deadline, scratch)
                    if isinstance(e, AlreadyExistsError) and on_commit is not None:
                        on_commit(i)
                    continue
                ok = False
                try:
                    conn.recv_blob_payload(view, length, algo, deadline)
                    ok = True
                finally:
                    view.release()
                    if ok:
                        self._tier.commit_put(key)
                    else:
                        self._tier.abort_put(key)
                committed += 1
                self.counters["chunks_pulled"] += 1
                self.counters["bytes_pulled"] += length
                self._note_stored([key])
                if on_commit is not None:
                    on_commit(i)
            conn.recv_frame(deadline, P.Kind.GET_END)
            self._client.pool.put(conn)
            conn = None
            self._note_rate((committed - pulled0) * self._blob_bytes, time.monotonic() - t0)
        except P.ChecksumError:
            self.counters["checksum_failures"] += 1
            self._count_bad_peer(src)
        except P.ProtocolError:
            self.counters["protocol_errors"] += 1
            self._count_bad_peer(src)
        except (DeadlineExceededError, TimeoutError):
            self.counters["pull_deadline_misses"] += 1
        except (OSError, KVTierError):
            self.counters["pull_failures"] += 1
        finally:
            if conn is not None:
                conn.close()
        self.counters["chunks_pull_failed"] += len(items) - committed
        return committed
