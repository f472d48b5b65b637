"""GossipDriver: drives a peer service's SWIM membership (membership.py) and the digests over TCP:
one protocol period a tick, this member's digest deltas riding on it, fetches of peers' digests."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections import Counter

from kvtier.errors import KVTierError
from kvtier.p2p import protocol as P
from kvtier.p2p.config import PeerConfig, parse_address
from kvtier.p2p.digest import LocalDigest, PeerDigests
from kvtier.p2p.membership import Membership, Outgoing
from kvtier.p2p.peer_client import PeerClient
from kvtier.p2p.transport import Deadline


class GossipDriver:
    """The gossip of a :class:`~kvtier.p2p.service.PeerService` at ``address``: its membership,
    its own ``digest`` and its view of the peers' ``digests``, the requests going out through
    ``client`` on the ``executor`` (never on the ticking thread). ``lock``, ``counters`` and
    ``count_bad_peer`` are the service's. :meth:`on_delta` and :meth:`on_record` are
    membership's callbacks (called under the lock)."""

    def __init__(
        self,
        config: PeerConfig,
        address: tuple[str, int],
        membership: Membership,
        digest: LocalDigest,
        digests: PeerDigests,
        client: PeerClient,
        executor: cf.ThreadPoolExecutor,
        lock: threading.RLock,
        counters: Counter,
        count_bad_peer,
    ) -> None:
        self.config = config
        self.address = address
        self._m = membership
        self._digest = digest
        self._digests = digests
        self._client = client
        self._gossip_exec = executor
        self._lock = lock
        self.counters = counters
        self._count_bad_peer = count_bad_peer
        self._fetching: set[str] = set()  # owners whose digest is being fetched

    def on_delta(self, d: P.DigestDelta) -> bool:
        before = self._digests.latest(d.owner)
        applied = self._digests.apply_delta(d)
        return applied or (d.generation, d.version) > before

    def on_record(self, rec: P.MemberRecord) -> None:
        if rec.state == P.DEAD:
            self._digests.forget(rec.node_id)
            self._client.pool.drop(rec.host, rec.port)  # idle connections to it are dead too
        else:
            self._digests.announce(rec.node_id, rec.digest_generation, rec.digest_version)

    def tick(self, now: float) -> None:
        """One protocol period: this member's digest deltas queued, membership's probes sent,
        the seeds asked again while no member is known, digests that fell behind fetched."""
        with self._lock:
            for d in self._digest.flush():
                self._m.queue_delta(d)
            self._m.set_digest_version(self._digest.generation, self._digest.version)
            outs = self._m.tick(now)
            alive = self._m.alive_ids()
            stale = [o for o in self._digests.stale() if o in alive and o not in self._fetching]
            if not self._m.members and self.config.seeds and now - getattr(self, "_last_join", 0) > 1.0:
                self._last_join = now
                outs += self._m.join_requests([parse_address(s, "seed") for s in self.config.seeds])
        self._dispatch(outs)
        for owner in stale[: self.config.digest_fetches_per_tick]:
            with self._lock:
                self._fetching.add(owner)
            self._gossip_exec.submit(self._fetch_digest, owner)

    def join_seeds(self) -> None:
        seeds = [parse_address(s, "peers.seeds entry") for s in self.config.seeds]
        seeds = [s for s in seeds if s != self.address]
        with self._lock:
            self._last_join = time.monotonic()
            outs = self._m.join_requests(seeds)
        self._dispatch(outs)

    def _dispatch(self, outs: list[Outgoing]) -> None:
        for o in outs:
            try:
                self._gossip_exec.submit(self._send_gossip, o)
            except RuntimeError:  # shut down
                return

    def _send_gossip(self, o: Outgoing) -> None:
        c = self.config
        if o.kind == P.Kind.PING:
            budget = c.ack_timeout_s
        elif o.kind == P.Kind.PING_REQ:
            budget = max(c.gossip_interval_s - c.ack_timeout_s, 2 * c.ack_timeout_s)
        else:
            budget = c.connect_timeout_s + c.request_timeout_s
        full = o.kind == P.Kind.SYNC
        expect = (P.Kind.SYNC_REPLY,) if full else (P.Kind.ACK, P.Kind.NACK)
        try:
            h, reply = self._client.exchange(o.host, o.port, o.kind, o.body.encode(), Deadline(budget), *expect)
            g = P.Gossip.decode(reply, full_state=full)
        except (OSError, KVTierError, TimeoutError) as e:
            if isinstance(e, P.ProtocolError):
                self._count_bad_peer(f"{o.host}:{o.port}")
            with self._lock:
                more = self._m.on_no_reply(o, time.monotonic())
            self._dispatch(more)
            return
        with self._lock:
            self._m.on_reply(h.kind, g, time.monotonic(), probe_of=o.probe_of)

    def _fetch_digest(self, owner: str) -> None:
        try:
            with self._lock:
                m = self._m.members.get(owner)
            if m is None:
                return
            with self._lock:
                have = self._digests.version_of(owner) or (0, 0)
            h, body = self._client.exchange(
                m.record.host,
                m.record.port,
                P.Kind.DIGEST_REQ,
                P.encode_digest_req(*have),
                Deadline(self.config.request_timeout_s),
                P.Kind.DIGEST,
                P.Kind.DIGEST_DELTAS,
            )
            if h.kind == P.Kind.DIGEST_DELTAS:
                deltas = P.decode_deltas(body)
                if any(d.owner != owner for d in deltas):
                    raise P.ProtocolError("DIGEST_DELTAS about another member")
                with self._lock:
                    for d in deltas:
                        self._digests.apply_delta(d)
                self.counters["digest_delta_fetches"] += 1
            else:
                snap = P.DigestSnapshot.decode(body)
                with self._lock:
                    self._digests.install(owner, snap)
                self.counters["digest_fetches"] += 1
        except (OSError, KVTierError, TimeoutError):
            self.counters["digest_fetch_failures"] += 1
        finally:
            with self._lock:
                self._fetching.discard(owner)
