"""RequestHandlers: a peer service's answers to the requests of an authenticated connection:
gossip (PING, PING_REQ, SYNC), digests, CONFIRM and GET of chunks, same-host pins."""

from __future__ import annotations

import threading
import time
from collections import Counter

from kvtier.errors import KVTierError
from kvtier.p2p import protocol as P
from kvtier.p2p.config import PeerConfig
from kvtier.p2p.digest import LocalDigest
from kvtier.p2p.membership import Membership
from kvtier.p2p.peer_client import PeerClient
from kvtier.p2p.same_host import SameHostSharing
from kvtier.p2p.transport import Connection, Deadline


class RequestHandlers:
    """What a :class:`~kvtier.p2p.service.PeerService` answers, one request at a time
    (:meth:`handle`; the connection's thread calls it). Chunks are served from ``tier``'s pool;
    with ``promote`` (a standalone node) a disk-only chunk is brought into the pool first.
    ``lock`` and ``counters`` are the service's; ``membership``, ``digest`` and ``client`` are
    what it made when it started (a PING_REQ is relayed through ``client``)."""

    def __init__(
        self,
        config: PeerConfig,
        tier,
        fingerprint: bytes,
        promote,
        lock: threading.RLock,
        counters: Counter,
        membership: Membership,
        digest: LocalDigest,
        client: PeerClient,
        sharing: SameHostSharing,
        nixl=None,
    ) -> None:
        self.config = config
        self._tier = tier
        self._fingerprint = fingerprint
        self._blob_bytes = int(tier.blob_bytes)
        self._promote = promote
        self._lock = lock
        self.counters = counters
        self._m = membership
        self._digest = digest
        self._client = client
        self._sharing = sharing
        self._nixl = nixl  # a NixlPath, or None: NIXL_* requests are answered "not offered"

    def handle(self, conn: Connection, h: P.Header, body: bytes, deadline: Deadline) -> None:
        K = P.Kind
        now = time.monotonic()
        if h.kind in (K.PING, K.SYNC):
            g = P.Gossip.decode(body, full_state=h.kind == K.SYNC)
            with self._lock:
                kind, reply = self._m.handle(h.kind, g, now)
            conn.send_frame(kind, h.request_id, reply.encode(), deadline)
        elif h.kind == K.PING_REQ:
            g = P.Gossip.decode(body)
            with self._lock:
                self._m.ingest(g, now)
                target = self._m.members.get(g.target)
                rec = None if target is None else target.record
            acked = False
            if rec is not None:
                with self._lock:
                    ping_body = self._m.ping_body()
                try:
                    hh, reply = self._client.exchange(
                        rec.host, rec.port, K.PING, ping_body.encode(), Deadline(self.config.ack_timeout_s), K.ACK
                    )
                    with self._lock:
                        self._m.on_reply(hh.kind, P.Gossip.decode(reply), time.monotonic())
                    acked = True
                except (OSError, KVTierError, TimeoutError):
                    acked = False
            with self._lock:
                kind, reply = self._m.relay_answer(acked, g.target)
            conn.send_frame(kind, h.request_id, reply.encode(), deadline)
        elif h.kind == K.DIGEST_REQ:
            gen, ver = P.decode_digest_req(body)
            with self._lock:
                deltas = self._digest.deltas_since(gen, ver) if (gen, ver) != (0, 0) else None
                if deltas is not None:
                    reply = (K.DIGEST_DELTAS, P.encode_deltas(deltas[: P.MAX_DELTAS_IN_REPLY]))
                else:
                    reply = (K.DIGEST, self._digest.snapshot().encode())
            conn.send_frame(reply[0], h.request_id, reply[1], deadline)
        elif h.kind == K.CONFIRM:
            keys = P.decode_keys(body)
            self._check_request_size(keys)
            shared = self._sharing.pages_shared_with(conn.peer_id)
            bits = [self._can_serve(k) or (shared is not None and shared.share_has(k)) for k in keys]
            self.counters["confirms_served"] += 1
            conn.send_frame(K.CONFIRM_REPLY, h.request_id, P.encode_bitmap(bits), deadline)
        elif h.kind == K.GET:
            keys = P.decode_keys(body)
            self._check_request_size(keys)
            self._serve_get(conn, h.request_id, keys, Deadline(self.config.request_timeout_s * 4))
        elif h.kind == K.GPU_OPEN:
            conn.send_frame(K.GPU_HANDLES, h.request_id, self._sharing.serve_gpu_open(conn, body).encode(), deadline)
        elif h.kind == K.GPU_PIN:
            keys = P.decode_keys(body)
            self._check_request_size(keys)
            conn.send_frame(K.GPU_PINNED, h.request_id, self._sharing.serve_gpu_pin(conn, keys).encode(), deadline)
        elif h.kind == K.GPU_UNPIN:
            held = self._sharing.serve_gpu_unpin(body)
            conn.send_frame(K.GPU_UNPINNED, h.request_id, bytes([held]), deadline)
        elif h.kind == K.NIXL_META_REQ:
            meta = self._nixl.meta() if self._nixl is not None else P.NixlMeta(False, self._no_nixl_reason())
            conn.send_frame(K.NIXL_META, h.request_id, meta.encode(), deadline)
        elif h.kind in (K.NIXL_LEASE, K.NIXL_LEASE_LATE):
            if self._nixl is None:
                raise P.ProtocolError("NIXL_LEASE to a member that offers no NIXL")
            keys = P.decode_keys(body)
            self._check_request_size(keys)
            if h.kind == K.NIXL_LEASE:
                leased = self._nixl.lease(keys)
                conn.send_frame(K.NIXL_LEASED, h.request_id, leased.encode(), deadline)
            else:
                leased = self._nixl.lease(keys, late=True)
                conn.send_frame(K.NIXL_LEASED_LATE, h.request_id, leased.encode_late(), deadline)
            self.counters["chunks_served"] += len(leased.blocks)  # leased to the puller's READ
            self.counters["bytes_served"] += len(leased.blocks) * self._blob_bytes
        elif h.kind == K.NIXL_SUMS_REQ:
            if self._nixl is None:
                raise P.ProtocolError("NIXL_SUMS_REQ to a member that offers no NIXL")
            crcs = self._nixl.sums(P.decode_lease(body), deadline.remaining())
            conn.send_frame(K.NIXL_SUMS, h.request_id, P.encode_sums(crcs), deadline)
        elif h.kind == K.NIXL_RELEASE:
            held = self._nixl is not None and self._nixl.release(P.decode_lease(body))
            conn.send_frame(K.NIXL_RELEASED, h.request_id, bytes([held]), deadline)
        else:
            raise P.ProtocolError(f"unexpected frame kind {h.kind} from a client")

    def _no_nixl_reason(self) -> str:
        if self.config.transport == "tcp":
            return "transport: tcp"
        from kvtier.p2p.nixl_agent import nixl_unavailable_reason

        return (nixl_unavailable_reason() or "NIXL agent not started")[:255]

    def _check_request_size(self, keys) -> None:
        if len(keys) > self.config.max_request_chunks:
            raise P.ProtocolError(f"request names {len(keys)} chunks, limit {self.config.max_request_chunks}")

    def _can_serve(self, key: bytes) -> bool:
        """Whether a GET of ``key`` would be served now (from the pool, or from disk where this
        member promotes). Asked without touching the tier's eviction order or admission counts:
        a CONFIRM is not a use of the chunk, the GET that follows it is."""
        if self._promote is not None:
            return self._tier.lookup(key) > 0
        codes = self._tier.lookup_tiers(key)
        return len(codes) > 0 and codes[0] == 1

    def _serve_get(self, conn: Connection, rid: int, keys: list[bytes], deadline: Deadline) -> None:
        for key in keys:
            views = self._tier.acquire_blobs(key)
            if not views and self._promote is not None and self._tier.lookup(key) > 0 and self._promote(key):
                views = self._tier.acquire_blobs(key)
            if not views:
                conn.send_frame(P.Kind.MISS, rid, key, deadline)
                continue
            try:
                conn.send_blob(rid, key, self._fingerprint, views[0], deadline)
            finally:
                views[0].release()
                del views
                self._tier.release_blobs(key)
            self.counters["chunks_served"] += 1
            self.counters["bytes_served"] += self._blob_bytes
        conn.send_frame(P.Kind.GET_END, rid, b"", deadline)
