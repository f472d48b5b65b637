"""PeerClient: this member's requests to peers, over a pool of authenticated connections (one
request and its reply each; a fresh connection where a pooled one had gone stale)."""

from __future__ import annotations

import itertools
import logging
import ssl
from collections import Counter

from kvtier.p2p.transport import AuthenticationError, Connection, ConnectionPool, Deadline

log = logging.getLogger(__name__)


class PeerClient:
    """The outbound side of a peer service: ``pool`` (its idle authenticated connections) and the
    request ids. ``counters`` are the service's (connects, outbound login and TLS failures)."""

    def __init__(self, pool: ConnectionPool, counters: Counter) -> None:
        self.pool = pool
        self.counters = counters
        self._rid = itertools.count(1)

    def next_rid(self) -> int:
        return next(self._rid)

    def exchange(self, host: str, port: int, kind: int, body: bytes, deadline: Deadline, *expect):
        """One request/reply on a pooled connection (a fresh one if a reused one was stale)."""
        for attempt in (0, 1):
            conn, reused = self.checkout(host, port, deadline)
            try:
                h, reply = conn.request(kind, next(self._rid), body, deadline, *expect)
            except (ConnectionError, BrokenPipeError):
                conn.close()
                if reused and attempt == 0:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            self.pool.put(conn)
            return h, reply
        raise ConnectionError("unreachable")

    def checkout(self, host, port, deadline) -> tuple[Connection, bool]:
        try:
            conn, reused = self.pool.get(host, port, deadline)
        except AuthenticationError:
            self.counters["auth_failures_outbound"] += 1
            raise
        except ssl.SSLError as e:
            self.counters["tls_failures_outbound"] += 1
            log.info("kvtier p2p: TLS to %s:%s failed: %s", host, port, e)
            raise
        if not reused:
            self.counters["connects"] += 1
        return conn, reused
